"""Iterative DPO — rounds of on-policy sampling, reward labelling and DPO (Xu et al. 2023, "Some things are more
CRINGE than others", arXiv:2312.16682; Xiong et al. 2024, "Iterative preference learning from human feedback",
arXiv:2312.11456; Yuan et al. 2024, self-rewarding LMs, with an external reward).

Each round r = 1..``rounds``:

1. **generate** two samples per prompt from the current policy π_{r−1} (``harness.generation.generate``,
   ``do_sample``, ``temperature``);
2. **label** them with ``job.reward``: the higher reward is chosen (ties are dropped — they carry no preference);
3. **DPO** on those pairs with ``methods/dpo.py``'s ``DPO`` (used as a plain object) on a sub-job
   starting from π_{r−1}, so the reference is updated every round (π_ref = π_{r−1});
4. **held-out reward**: greedy completions of the first ``heldout_prompts`` held-out prompts, scored by the
   reward. *Stopping rule*: when the mean held-out reward of round r does not exceed that of round r−1
   (round 0 = the starting checkpoint) by more than ``min_improvement``, no further round is run.

The saved policy is the trained round with the highest mean held-out reward (so a round that made things
worse is discarded, its cost still counted); at least round 1 is always kept.

**Budget**: the budget's prompts are split into ``rounds`` equal consecutive chunks, one per round (a fresh
prompt set per iteration, as Xiong et al. 2024), so all rounds together take the optimizer steps of one DPO
pass over the budget's pairs; each chunk must hold at least ``budget.batch_pairs`` prompts (under
``budget.match=tokens|flops`` the matcher gives at least ``rounds × budget.batch_pairs`` prompts, and records
when that is more than the target buys; ``visit_cost``, ``run_cost`` and ``visit_granularity`` are the method's
cost model there, ``harness.matching``).
**Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): the DPO rounds' own counts, plus,
forward-only, the generation tokens (prompt + completion of every sample and held-out completion, counted
by re-tokenizing) and reward-model tokens × N_reward/N. ``extra`` records ``rounds_done``, ``stopped_early``,
per-round held-out rewards and the chosen round.

The round structure is shared as plain functions (``train_in_rounds``, ``Sampler``, ``best_and_worst``,
``mean_win_probabilities``, ...): ``methods/self_rewarding.py`` (the policy judges its own samples) and
``methods/sppo.py`` (K samples, win probabilities, TRL's ``sppo_hard`` loss) run the same loop and differ only
in who labels a round's samples and which loss trains it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, replace
from typing import Callable

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


class IterativeDPO:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "iterative_dpo", rounds: int = 3, beta: float = 0.1, learning_rate: float = 5e-7,
                 temperature: float = 1.0, heldout_prompts: int = 32, min_improvement: float = 0.0):
        check_rounds(name, rounds)
        self.name = name
        self.rounds = rounds
        self.beta = beta
        self.learning_rate = learning_rate
        self.temperature = temperature
        self.heldout_prompts = heldout_prompts
        self.min_improvement = min_improvement

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in ("rounds", "beta", "learning_rate", "temperature", "heldout_prompts",
                                              "min_improvement")}

    # cost model for budget.match=tokens|flops (harness.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One prompt in its round: two samples generated and scored by the reward, then one DPO pair of them
        (both sequences trained, and scored by the round's reference). Ties (no pair) make it cheaper."""
        samples = 2 * (prompt_tokens + completion_tokens)
        return float(samples), samples * (2.0 + sizes.reward_share)

    def run_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes,
                 heldout_prompts: int) -> tuple[float, float]:
        """The stopping rule's greedy held-out completions, scored by the reward: round 0 and after every round (all
        rounds assumed to run; an early stop makes the run cheaper)."""
        return heldout_evaluation_cost(self.rounds, min(self.heldout_prompts, heldout_prompts), prompt_tokens,
                                       completion_tokens, sizes)

    def visit_granularity(self, budget) -> tuple[int, int]:
        return rounds_granularity(self.rounds, budget)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.rewards import reward_record
        from methods.dpo import DPO

        reward = job.reward
        if reward is None:
            raise HarnessError(f"{self.name} needs a reward: set reward=<name> (conf/reward/)")
        sampler = Sampler(job.budget, self.temperature)
        reward_before = reward.tokens_scored

        def label(path, prompts: list, round_number: int) -> tuple[list[dict], dict]:
            """Two samples per prompt, the higher-reward one chosen; ties dropped."""
            samples = sampler.samples(path, prompts, 2, seed=round_seed(job.seed, round_number, 2))
            scores = score_samples(reward, prompts, samples)
            pairs = []
            for prompt, texts, values in zip(prompts, samples, scores):
                picked = best_and_worst(values)
                if picked is not None:
                    pairs.append({"prompt": prompt, "chosen": texts[picked[0]], "rejected": texts[picked[1]]})
            return pairs, {"reward": sum(map(sum, scores)) / (2 * len(prompts))}

        rounds = train_in_rounds(job, name=self.name, rounds=self.rounds, label=label,
                                 round_method=DPO(beta=self.beta, learning_rate=self.learning_rate),
                                 heldout_score=lambda path, prompts: heldout_reward(sampler, reward, path, prompts),
                                 heldout_prompts=self.heldout_prompts, min_improvement=self.min_improvement)
        reward_tokens = reward.tokens_scored - reward_before
        reference_tokens = (rounds.totals["reference_tokens"] + sampler.tokens
                            + reward_tokens * reward.parameters / rounds.parameters)
        extra = {**rounds.summary(), "train_rewards": [h["reward"] for h in rounds.trained],
                 "generation_tokens": sampler.tokens, "reward_tokens": reward_tokens,
                 "reward_parameters": reward.parameters,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", "reward": reward_record(reward)}
        return rounds.outcome(reference_tokens=reference_tokens, extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# the round loop, shared with methods/self_rewarding.py and methods/sppo.py


@dataclass
class Rounds:
    """What ``train_in_rounds`` did: round 0 (the start) and every trained round, and their summed DPO cost."""

    history: list[dict]         # {"round", "heldout_reward", "pairs", "ties_dropped", **label statistics}
    totals: dict                # the rounds' summed TrainingOutcome counts (optimizer_steps, examples, ...)
    curves: list[dict]
    stopped_early: bool
    chosen_round: int
    parameters: int             # of the saved policy, for scaling other models' tokens to policy equivalents

    @property
    def trained(self) -> list[dict]:
        return self.history[1:]

    def summary(self) -> dict:
        """The ``extra`` keys every round-based method records."""
        return {"rounds_done": len(self.trained), "stopped_early": self.stopped_early,
                "chosen_round": self.chosen_round, "heldout_rewards": [h["heldout_reward"] for h in self.history],
                "round_pairs": [h["pairs"] for h in self.trained],
                "round_ties_dropped": [h["ties_dropped"] for h in self.trained],
                "dpo_reference_tokens": self.totals["reference_tokens"]}

    def outcome(self, *, reference_tokens: float, extra: dict) -> TrainingOutcome:
        return TrainingOutcome(optimizer_steps=self.totals["optimizer_steps"], examples=self.totals["examples"],
                               pairs=self.totals["pairs"], policy_tokens=self.totals["policy_tokens"],
                               reference_tokens=round(reference_tokens), curves=self.curves, extra=extra)


def train_in_rounds(job: TrainingJob, *, name: str, rounds: int, label: Callable, round_method,
                    heldout_score: Callable | None = None, heldout_prompts: int = 0,
                    min_improvement: float = 0.0) -> Rounds:
    """Iterate: label the current policy's samples on a fresh chunk of the budget's prompts, train a round from it.

    ``label(path, prompts, round_number) -> (pairs, statistics)`` decides who labels (a reward, a judge, the policy
    itself); ``round_method.train(sub_job)`` trains one round from the current policy, which is also its reference.
    ``heldout_score(path, prompts) -> float`` is the stopping rule's yardstick on the first ``heldout_prompts``
    held-out prompts (see the module docstring); without it every round runs and the last one is kept.
    Saves the kept round into ``job.output_dir``.
    """
    budget = job.budget
    prompts = [row["prompt"] for row in job.data["train"]]
    size = len(prompts) // rounds
    if size < budget.batch_pairs:
        raise HarnessError(f"{name}: {len(prompts)} prompts in {rounds} rounds leave {size} per round, "
                           f"fewer than budget.batch_pairs={budget.batch_pairs}; raise budget.pairs or lower rounds")
    chunks = [prompts[r * size: (r + 1) * size] for r in range(rounds)]
    heldout = [row["prompt"] for row in job.data["heldout"][:heldout_prompts]]
    if heldout_score is not None and not heldout:
        raise HarnessError(f"{name}: no held-out prompts for the stopping rule; set data.heldout_pairs > 0")

    def yardstick(path) -> float | None:
        return heldout_score(path, heldout) if heldout_score is not None else None

    current = job.start_checkpoint
    history = [{"round": 0, "heldout_reward": yardstick(current)}]
    totals = {"optimizer_steps": 0, "examples": 0, "pairs": 0.0, "policy_tokens": 0, "reference_tokens": 0}
    curves: list[dict] = []
    stopped_early = False
    for round_number, chunk in enumerate(chunks, start=1):
        pairs, statistics = label(current, chunk, round_number)
        if not pairs:  # every prompt's samples tied: nothing to learn from
            stopped_early = True
            break
        output = job.scratch_dir / f"round-{round_number}"
        sub_job = TrainingJob(start_checkpoint=current, output_dir=output, data={"train": pairs, "heldout": []},
                              budget=replace(budget, pairs=len(pairs)), seed=job.seed,
                              scratch_dir=job.scratch_dir / f"round-{round_number}-trainer",
                              reference_cache_dir=job.reference_cache_dir)
        outcome = round_method.train(sub_job)
        for entry in outcome.curves:
            curves.append({**entry, "round": round_number, "step": totals["optimizer_steps"] + entry.get("step", 0)})
        for key in totals:
            totals[key] += getattr(outcome, key)
        score = yardstick(output)
        history.append({"round": round_number, "heldout_reward": score, **statistics, "pairs": len(pairs),
                        "ties_dropped": len(chunk) - len(pairs), "path": output})
        curves.append({"round": round_number, "step": totals["optimizer_steps"], "heldout_reward": score,
                       **statistics, "pairs": len(pairs)})
        current = output
        if score is not None and score <= history[-2]["heldout_reward"] + min_improvement:
            stopped_early = round_number < rounds
            break
    trained = history[1:]
    if not trained:
        raise HarnessError(f"{name}: the first round's samples tied on every prompt; no pair to train on")
    best = trained[-1] if heldout_score is None else max(trained, key=lambda h: h["heldout_reward"])
    shutil.copytree(best["path"], job.output_dir, dirs_exist_ok=True)
    shutil.rmtree(job.scratch_dir, ignore_errors=True)

    from transformers import AutoConfig

    from harness.rewards import parameter_count

    parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
    for entry in history:
        entry.pop("path", None)
    return Rounds(history=history, totals=totals, curves=curves, stopped_early=stopped_early,
                  chosen_round=best["round"], parameters=parameters)


class Sampler:
    """Completions of chat prompts from a checkpoint, up to ``budget.max_completion_tokens`` new tokens.

    ``tokens`` counts prompt + completion tokens of every sequence generated (re-tokenized): the forward-only
    generation cost in policy tokens.
    """

    def __init__(self, budget, temperature: float, top_k: int | None = None):
        self.budget, self.temperature, self.top_k, self.tokens = budget, temperature, top_k, 0

    def complete(self, path, prompts: list, *, seeds: list[int] | None = None) -> list[list[str]]:
        """Per prompt, one sampled completion per seed (loading the model once), or one greedy one without seeds."""
        import torch

        from harness.generation import format_prompt, generate, load_for_generation

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_for_generation(path, device)
        use_template = bool(getattr(tokenizer, "chat_template", None))
        texts = [format_prompt(tokenizer, p, use_template) for p in prompts]
        prompt_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        columns = []
        for seed in seeds if seeds is not None else [None]:
            outputs = generate(model, tokenizer, texts, max_new_tokens=self.budget.max_completion_tokens,
                               batch_size=2 * self.budget.micro_batch_pairs, do_sample=seed is not None,
                               temperature=self.temperature, top_k=self.top_k, seed=seed or 0, device=device)
            self.tokens += prompt_tokens + sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
            columns.append(outputs)
        return [list(row) for row in zip(*columns)]

    def samples(self, path, prompts: list, count: int, *, seed: int) -> list[list[str]]:
        """``count`` sampled completions per prompt, with seeds ``seed``, ``seed + 1``, ..."""
        return self.complete(path, prompts, seeds=[seed + k for k in range(count)])


# Tokens the judging prompt (harness.judges.JUDGE_PROMPT with empty fields, the chat template and the answer prefix)
# adds around an instruction and two responses, measured with the SmolLM2 tokenizer: the cost models' estimate of a
# local judge's reading.
JUDGE_PROMPT_TOKENS = 95


def check_rounds(name: str, rounds: int, samples: int | None = None) -> None:
    """The round-based methods' shared config checks: at least one round, at least two samples a prompt."""
    if rounds < 1:
        raise HarnessError(f"{name}: rounds={rounds} must be at least 1 (conf/method/{name}.yaml)")
    if samples is not None and samples < 2:
        raise HarnessError(f"{name}: samples={samples} must be at least 2 per prompt to form a pair")


def heldout_evaluation_cost(rounds: int, heldout_prompts: int, prompt_tokens: int, completion_tokens: int,
                            sizes) -> tuple[float, float]:
    """(trained, forward-only) tokens of the stopping rule: greedy held-out completions scored by the reward, at
    round 0 and after every round (all rounds assumed to run; an early stop makes the run cheaper)."""
    completions = (rounds + 1) * heldout_prompts
    return 0.0, completions * (prompt_tokens + completion_tokens) * (1.0 + sizes.reward_share)


def rounds_granularity(rounds: int, budget) -> tuple[int, int]:
    """(minimum, multiple) prompt visits of a method trained in rounds: ``train_in_rounds`` needs ≥ batch_pairs
    prompts per round."""
    return rounds * budget.batch_pairs, rounds


def judged_visit_tokens(samples: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Prompt tokens a local judge reads to compare all pairs of ``samples`` completions of one prompt in both orders."""
    return samples * (samples - 1) * (JUDGE_PROMPT_TOKENS + prompt_tokens + 2 * completion_tokens)


def round_seed(seed: int, round_number: int, count: int) -> int:
    """The first sampling seed of a round (distinct across rounds and samples for one run seed)."""
    return 1000 * seed + count * round_number


def score_samples(reward, prompts: list, samples: list[list[str]]) -> list[list[float]]:
    """``reward.score`` of every sample, per prompt."""
    flat_prompts = [prompt for prompt, texts in zip(prompts, samples) for _ in texts]
    flat = reward.score(flat_prompts, [text for texts in samples for text in texts])
    out, position = [], 0
    for texts in samples:
        out.append(flat[position: position + len(texts)])
        position += len(texts)
    return out


def heldout_reward(sampler: Sampler, reward, path, prompts: list) -> float:
    """Mean reward of greedy completions of the held-out prompts (the stopping rule's yardstick)."""
    completions = [texts[0] for texts in sampler.complete(path, prompts)]
    scores = reward.score(prompts, completions)
    return sum(scores) / len(scores)


def best_and_worst(values: list[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest value (the first of equals), or None when all are equal: a prompt whose
    samples tie carries no preference, so it gives no pair."""
    best = max(range(len(values)), key=lambda k: values[k])
    worst = min(range(len(values)), key=lambda k: values[k])
    return None if values[best] == values[worst] else (best, worst)


def bradley_terry_matrix(rewards: list[float]) -> list[list[float]]:
    """P[i][j] = σ(r_i − r_j): the probability that sample i beats sample j under a Bradley–Terry model of the
    rewards (Bradley & Terry 1952); P[i][i] = ½. What SPPO's ``compute_prob.py`` builds from PairRM scores."""
    return [[1.0 / (1.0 + math.exp(r_j - r_i)) for r_j in rewards] for r_i in rewards]


def mean_win_probabilities(matrix: list[list[float]]) -> list[float]:
    """P̂(y_i ≻ π | x) = (1/K) Σ_j P[i][j] over the K samples y_1..y_K of the current policy π, the diagonal ½
    included: SPPO's Monte-Carlo estimate of a response's win probability against the policy (Wu et al. 2024,
    arXiv:2405.00675, Algorithm 1, the estimate of P(y ≻ π_t | x); the authors' ``compute_prob.py`` sums each
    row of the K×K matrix and divides by K)."""
    size = len(matrix)
    return [sum(row) / size for row in matrix]


def judged_win_matrices(judge, prompts: list, samples: list[list[str]]) -> tuple[list[list[list[float]]], list]:
    """Per prompt, the K×K matrix P[i][j] = P(sample i better than sample j) from a pairwise judge
    (``harness.judges``; both presentation orders averaged, so P[j][i] = 1 − P[i][j]). Each unordered pair is judged
    once; identical samples are a draw (½) without asking. Returns (matrices, the judgments made)."""
    from harness.feedback import conversation_text

    items, where = [], []
    matrices = [[[0.5] * len(texts) for _ in texts] for texts in samples]
    for p, (prompt, texts) in enumerate(zip(prompts, samples)):
        instruction = conversation_text(prompt)
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if texts[i] != texts[j]:
                    items.append((instruction, texts[i], texts[j]))
                    where.append((p, i, j))
    judgments = judge.judge_batch(items) if items else []
    for (p, i, j), judgment in zip(where, judgments):
        matrices[p][i][j] = judgment.probability
        matrices[p][j][i] = 1.0 - judgment.probability
    return matrices, judgments

