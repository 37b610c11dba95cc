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
pass over the budget's pairs; each chunk must hold at least ``budget.batch_pairs`` prompts.
**Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): the DPO rounds' own counts, plus,
forward-only, the generation tokens (prompt + completion of every sample and held-out completion, counted
by re-tokenizing) and reward-model tokens × N_reward/N. ``extra`` records ``rounds_done``, ``stopped_early``,
per-round held-out rewards and the chosen round.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


class IterativeDPO:
    data_view = "pairs"        # only the prompts are used
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "iterative_dpo", rounds: int = 3, beta: float = 0.1, learning_rate: float = 5e-7,
                 temperature: float = 1.0, heldout_prompts: int = 32, min_improvement: float = 0.0):
        if rounds < 1:
            raise HarnessError(f"iterative_dpo: rounds={rounds} must be at least 1 (conf/method/iterative_dpo.yaml)")
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

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from methods.dpo import DPO

        reward, budget = job.reward, job.budget
        if reward is None:
            raise HarnessError("iterative_dpo needs a reward: set reward=<name> (conf/reward/)")
        prompts = [row["prompt"] for row in job.data["train"]]
        size = len(prompts) // self.rounds
        if size < budget.batch_pairs:
            raise HarnessError(f"iterative_dpo: {len(prompts)} prompts in {self.rounds} rounds leave {size} per round, "
                               f"fewer than budget.batch_pairs={budget.batch_pairs}; raise budget.pairs or lower rounds")
        chunks = [prompts[r * size: (r + 1) * size] for r in range(self.rounds)]
        heldout = [row["prompt"] for row in job.data["heldout"][: self.heldout_prompts]]
        if not heldout:
            raise HarnessError("iterative_dpo: no held-out prompts for the stopping rule; set data.heldout_pairs > 0")
        self._generated_tokens = 0
        reward_before = reward.tokens_scored

        current = job.start_checkpoint
        history = [{"round": 0, "heldout_reward": self._heldout_reward(current, heldout, job)}]
        totals = {"optimizer_steps": 0, "examples": 0, "pairs": 0.0, "policy_tokens": 0, "reference_tokens": 0}
        curves: list[dict] = []
        stopped_early = False
        for round_number, chunk in enumerate(chunks, start=1):
            pairs, train_reward = self._labelled_pairs(current, chunk, job, round_number)
            if not pairs:  # every sample pair tied: nothing to learn from
                stopped_early = True
                break
            output = job.scratch_dir / f"round-{round_number}"
            sub_job = TrainingJob(start_checkpoint=current, output_dir=output, data={"train": pairs, "heldout": []},
                                  budget=replace(budget, pairs=len(pairs)), seed=job.seed,
                                  scratch_dir=job.scratch_dir / f"round-{round_number}-trainer",
                                  reference_cache_dir=job.reference_cache_dir)
            outcome = DPO(beta=self.beta, learning_rate=self.learning_rate).train(sub_job)
            for entry in outcome.curves:
                curves.append({**entry, "round": round_number, "step": totals["optimizer_steps"] + entry.get("step", 0)})
            for key in totals:
                totals[key] += getattr(outcome, key)
            score = self._heldout_reward(output, heldout, job)
            history.append({"round": round_number, "heldout_reward": score, "train_reward": train_reward,
                            "pairs": len(pairs), "ties_dropped": len(chunk) - len(pairs), "path": output})
            curves.append({"round": round_number, "step": totals["optimizer_steps"], "heldout_reward": score,
                           "reward": train_reward, "pairs": len(pairs)})
            current = output
            if score <= history[-2]["heldout_reward"] + self.min_improvement:
                stopped_early = round_number < self.rounds
                break
        trained = history[1:]
        if not trained:
            raise HarnessError("iterative_dpo: the first round's two samples tied on every prompt; no pair to train on")
        best = max(trained, key=lambda h: h["heldout_reward"])
        shutil.copytree(best["path"], job.output_dir, dirs_exist_ok=True)
        shutil.rmtree(job.scratch_dir, ignore_errors=True)

        from transformers import AutoConfig

        from harness.rewards import parameter_count, reward_record

        parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
        reward_tokens = reward.tokens_scored - reward_before
        reference_tokens = (totals["reference_tokens"] + self._generated_tokens
                            + reward_tokens * reward.parameters / parameters)
        extra = {"rounds_done": len(trained), "stopped_early": stopped_early, "chosen_round": best["round"],
                 "heldout_rewards": [h["heldout_reward"] for h in history],
                 "train_rewards": [h.get("train_reward") for h in history[1:]],
                 "round_pairs": [h["pairs"] for h in history[1:]],
                 "generation_tokens": self._generated_tokens, "reward_tokens": reward_tokens,
                 "dpo_reference_tokens": totals["reference_tokens"], "reward_parameters": reward.parameters,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", "reward": reward_record(reward)}
        return TrainingOutcome(optimizer_steps=totals["optimizer_steps"], examples=totals["examples"],
                               pairs=totals["pairs"], policy_tokens=totals["policy_tokens"],
                               reference_tokens=round(reference_tokens), curves=curves, extra=extra)

    # -------------------------------------------------------------------------------------------
    def _generate(self, path, prompts: list, job: TrainingJob, *, sample: bool, seed: int = 0) -> list[str]:
        import torch

        from harness.generation import format_prompt, generate, load_for_generation

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_for_generation(path, device)
        use_template = bool(getattr(tokenizer, "chat_template", None))
        texts = [format_prompt(tokenizer, p, use_template) for p in prompts]
        outputs = generate(model, tokenizer, texts, max_new_tokens=job.budget.max_completion_tokens,
                           batch_size=2 * job.budget.micro_batch_pairs, do_sample=sample, temperature=self.temperature,
                           seed=seed, device=device)
        self._generated_tokens += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts + outputs)
        return outputs

    def _heldout_reward(self, path, prompts: list, job: TrainingJob) -> float:
        """Mean reward of greedy completions of the held-out prompts (the stopping rule's yardstick)."""
        scores = job.reward.score(prompts, self._generate(path, prompts, job, sample=False))
        return sum(scores) / len(scores)

    def _labelled_pairs(self, path, prompts: list, job: TrainingJob, round_number: int) -> tuple[list[dict], float]:
        """Two samples per prompt from ``path``, the higher-reward one chosen; ties dropped."""
        seed = 1000 * job.seed + 2 * round_number
        first = self._generate(path, prompts, job, sample=True, seed=seed)
        second = self._generate(path, prompts, job, sample=True, seed=seed + 1)
        first_scores, second_scores = job.reward.score(prompts, first), job.reward.score(prompts, second)
        pairs = []
        for prompt, a, b, score_a, score_b in zip(prompts, first, second, first_scores, second_scores):
            if score_a == score_b:
                continue
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        mean = (sum(first_scores) + sum(second_scores)) / (2 * len(prompts))
        return pairs, mean
