"""The round loop of on-policy methods (``iterative_dpo``, ``sppo``, ``self_rewarding``, ``rso``'s sampler):
sample from the current policy, label, train a DPO-family round from it, keep the best round.

Each round r = 1..R trains on its own consecutive chunk of the budget's prompts, from π_{r−1}, which is also its
reference; a held-out yardstick may stop the loop early (see ``train_in_rounds``). Cost helpers
(``heldout_evaluation_cost``, ``rounds_granularity``, ``judged_visit_tokens``) are what these methods' cost models
for ``budget.match=tokens|flops`` share (``harness.train.matching``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.processes import barrier, on_first, process_device, process_group


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
    prompts = [row["prompt"] for row in job.plan.rows]
    size = len(prompts) // rounds
    if size < budget.batch_pairs:
        raise HarnessError(f"{name}: {len(prompts)} prompts in {rounds} rounds leave {size} per round, "
                           f"fewer than budget.batch_pairs={budget.batch_pairs}; raise budget.pairs or lower rounds")
    chunks = [prompts[r * size: (r + 1) * size] for r in range(rounds)]
    heldout = [row["prompt"] for row in job.plan.heldout[:heldout_prompts]]
    if heldout_score is not None and not heldout:
        raise HarnessError(f"{name}: no held-out prompts for the stopping rule; set data.heldout_pairs > 0")

    rank, world = process_group()  # many processes (harness.run.launch): rank 0 samples, labels and judges alone

    def yardstick(path) -> float | None:
        return on_first(lambda: heldout_score(path, heldout), world) if heldout_score is not None else None

    current = job.start_checkpoint
    history = [{"round": 0, "heldout_reward": yardstick(current)}]
    totals = {"optimizer_steps": 0, "examples": 0, "pairs": 0.0, "policy_tokens": 0, "reference_tokens": 0}
    curves: list[dict] = []
    stopped_early = False
    for round_number, chunk in enumerate(chunks, start=1):
        pairs, statistics = on_first(lambda: label(current, chunk, round_number), world)
        if not pairs:  # every prompt's samples tied: nothing to learn from
            stopped_early = True
            break
        output = job.scratch_dir / f"round-{round_number}"
        sub_job = TrainingJob(start_checkpoint=current, output_dir=output, plan=job.plan.for_rows(pairs), seed=job.seed,
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
    if rank == 0:
        shutil.copytree(best["path"], job.output_dir, dirs_exist_ok=True)
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
    barrier(world)

    from transformers import AutoConfig

    from harness.train.rewards import parameter_count

    parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
    for entry in history:
        entry.pop("path", None)
    return Rounds(history=history, totals=totals, curves=curves, stopped_early=stopped_early,
                  chosen_round=best["round"], parameters=parameters)


class Sampler:
    """Completions of chat prompts from a checkpoint, up to ``budget.max_completion_tokens`` new tokens, in batches of
    the training plan's ``sequence_batch`` (``harness.train.plan``).

    ``tokens`` counts prompt + completion tokens of every sequence generated (re-tokenized): the forward-only
    generation cost in policy tokens.
    """

    def __init__(self, plan, temperature: float, top_k: int | None = None, engine: str = "harness"):
        self.plan, self.temperature, self.top_k, self.tokens = plan, temperature, top_k, 0
        self.engine = engine  # harness.evaluate.engines: vllm samples through vllm.LLM, the others through torch

    def complete(self, path, prompts: list, *, seeds: list[int] | None = None) -> list[list[str]]:
        """Per prompt, one sampled completion per seed (loading the model once), or one greedy one without seeds."""
        import torch
        from harness.inputs.tokenizer_cache import load_tokenizer

        from harness.evaluate.engines import generator
        from harness.evaluate.generation import format_prompt

        device = process_device() if process_group()[1] > 1 else "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = load_tokenizer(path)
        use_template = bool(getattr(tokenizer, "chat_template", None))
        texts = [format_prompt(tokenizer, p, use_template) for p in prompts]
        prompt_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        generate = generator(path, engine=self.engine, device=device, batch_size=self.plan.sequence_batch)
        columns = []
        for seed in seeds if seeds is not None else [None]:
            outputs = generate(texts, max_new_tokens=self.plan.budget.max_completion_tokens, do_sample=seed is not None,
                               temperature=self.temperature, top_k=self.top_k, seed=seed or 0)
            self.tokens += prompt_tokens + sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
            columns.append(outputs)
        return [list(row) for row in zip(*columns)]

    def samples(self, path, prompts: list, count: int, *, seed: int) -> list[list[str]]:
        """``count`` sampled completions per prompt, with seeds ``seed``, ``seed + 1``, ..."""
        return self.complete(path, prompts, seeds=[seed + k for k in range(count)])


# Tokens the judging prompt (harness.evaluate.judges.JUDGE_PROMPT with empty fields, the chat template and the answer prefix)
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
