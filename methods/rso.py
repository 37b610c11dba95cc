"""RSO — Statistical Rejection Sampling Optimization (Liu et al. 2023, "Statistical rejection sampling improves
preference optimization", arXiv:2309.06657).

DPO fits the optimal policy of the KL-constrained reward objective, π_r(y|x) ∝ π_sft(y|x)·exp(r(x,y)/β) (eq. 4),
on pairs drawn from whatever policies wrote the data. RSO draws its pairs from (an estimate of) π_r itself:

1. **sample** ``candidates`` completions per prompt from the starting checkpoint π_sft (``harness.generation``,
   temperature ``temperature``; the paper: 64 at temperature 0.7, top-k 40 — the harness samples without top-k);
2. **score** them with the sweep's reward ``job.reward`` (``conf/reward/``);
3. **rejection-sample** ``accepted`` distinct ones by Algorithm 1 (``statistical_rejection_sampling``): accept y with
   probability exp((r(x,y) − r_max)/β) (eqs. 13–14, Theorem 1), r_max the highest reward not yet accepted — which
   turns samples of π_sft into samples of π_r; β → 0 keeps the top-k, β → ∞ accepts everything;
4. **pair** the accepted samples and label each pair by the reward (``rank_pairs``): ``first-round`` pairs
   (y1, y2), (y3, y4), ... (n/2 pairs; the paper's best by AutoSxS, Table 2, "rso-8-sample-first-round-rank"), or
   ``tournament`` (n − 1 pairs, winners advance); a tied pair carries no preference and is dropped;
5. **train** with the paper's loss on normalized likelihood through ``methods/dpo.py``'s ``DPO`` (used as a plain
   object, so budget, precision, LoRA, curves and the reference log-prob cache come with it): ``hinge`` (hinge-norm,
   eq. 10: max(0, 1 − γ·Δ), Δ = log πθ(y_w|x)/π_sft(y_w|x) − log πθ(y_l|x)/π_sft(y_l|x); TRL's ``loss_type="hinge"``
   with β = γ) or ``sigmoid`` (sigmoid-norm, eq. 8: −log σ(γ·Δ), DPO with β = γ). The reference is π_sft.

**Budget**: RSO trains DPO on the budget's number of pairs (DPO's optimizer steps under ``budget.match=examples``).
It draws them from the budget's prompts in order — the first ⌈pairs / pairs per prompt⌉, more while ties leave it
short — and keeps the first ``budget.pairs`` labelled pairs. Each prompt costs ``candidates`` generations and reward
scores. **Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): the DPO run's own counts, plus,
forward-only, the generation tokens (prompt + completion of every candidate, re-tokenized) and the reward model's
tokens × N_reward/N. ``visit_cost`` prices one pair for ``budget.match=tokens|flops`` the same way.
``extra`` records the rejection-sampling statistics (candidate, accepted, chosen and rejected mean rewards).
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import replace
from typing import Callable

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome

LOSSES = ("hinge", "sigmoid")
RANKINGS = ("first-round", "tournament")


class RSO:
    data_view = "pairs"        # only the prompts are used
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "rso", loss_type: str = "hinge", gamma: float = 0.05, rejection_beta: float = 0.5,
                 candidates: int = 64, accepted: int = 8, ranking: str = "first-round", temperature: float = 0.7,
                 learning_rate: float = 5e-7):
        where = f"{name} (conf/method/rso.yaml)"
        if loss_type not in LOSSES:
            raise HarnessError(f"{where}: loss_type={loss_type!r}; choose one of {', '.join(LOSSES)}")
        if ranking not in RANKINGS:
            raise HarnessError(f"{where}: ranking={ranking!r}; choose one of {', '.join(RANKINGS)}")
        if not 2 <= accepted <= candidates:
            raise HarnessError(f"{where}: need 2 ≤ accepted ≤ candidates; got accepted={accepted}, "
                               f"candidates={candidates}")
        if gamma <= 0 or rejection_beta < 0:
            raise HarnessError(f"{where}: gamma={gamma} must be > 0 and rejection_beta={rejection_beta} ≥ 0")
        self.name = name
        self.loss_type = loss_type
        self.gamma = gamma
        self.rejection_beta = rejection_beta
        self.candidates = candidates
        self.accepted = accepted
        self.ranking = ranking
        self.temperature = temperature
        self.learning_rate = learning_rate

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in ("loss_type", "gamma", "rejection_beta", "candidates", "accepted",
                                              "ranking", "temperature", "learning_rate")}

    # cost model for budget.match=tokens|flops (harness.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One labelled pair: its share of a prompt's candidates generated and scored by the reward, then one DPO
        pair (both sequences trained and scored by the reference). Ties (no pair) make a pair dearer."""
        sequence = prompt_tokens + completion_tokens
        sampled = self.candidates / games_per_prompt(self.accepted, self.ranking) * sequence
        return 2.0 * sequence, 2.0 * sequence + sampled * (1.0 + sizes.reward_share)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.rewards import parameter_count, reward_record
        from methods.dpo import DPO
        from methods.iterative_dpo import Sampler, round_seed, score_samples

        reward = job.reward
        if reward is None:
            raise HarnessError(f"{self.name} needs a reward to rejection-sample with: set reward=<name> (conf/reward/)")
        target = len(job.data["train"])
        prompts = [row["prompt"] for row in job.data["train"]]
        per_prompt = games_per_prompt(self.accepted, self.ranking)
        sampler = Sampler(job.budget, self.temperature)
        reward_before = reward.tokens_scored
        uniform = random.Random(job.seed).random
        pairs: list[dict] = []
        statistics = {"prompts_sampled": 0, "candidates": 0, "distinct_candidates": 0, "accepted": 0,
                      "candidate_reward_sum": 0.0, "accepted_reward_sum": 0.0, "ties_dropped": 0}
        position, chunk_number = 0, 0
        while len(pairs) < target and position < len(prompts):
            chunk_number += 1
            chunk = prompts[position: position + math.ceil((target - len(pairs)) / per_prompt)]
            position += len(chunk)
            samples = sampler.samples(job.start_checkpoint, chunk, self.candidates,
                                      seed=round_seed(job.seed, chunk_number, self.candidates))
            for prompt, sampled, scores in zip(chunk, samples, score_samples(reward, chunk, samples)):
                distinct = dict(zip(sampled, scores))  # Algorithm 1 draws distinct responses (a dict of candidates)
                texts, values = list(distinct), list(distinct.values())
                chosen = statistical_rejection_sampling(values, min(self.accepted, len(texts)), self.rejection_beta,
                                                        uniform)
                accepted_rewards = [values[i] for i in chosen]
                labelled = rank_pairs(accepted_rewards, self.ranking)
                for winner, loser in labelled:
                    pairs.append({"prompt": prompt, "chosen": texts[chosen[winner]],
                                  "rejected": texts[chosen[loser]], "chosen_reward": accepted_rewards[winner],
                                  "rejected_reward": accepted_rewards[loser]})
                statistics["prompts_sampled"] += 1
                statistics["candidates"] += len(sampled)
                statistics["distinct_candidates"] += len(texts)
                statistics["accepted"] += len(chosen)
                statistics["candidate_reward_sum"] += sum(values)
                statistics["accepted_reward_sum"] += sum(accepted_rewards)
                statistics["ties_dropped"] += games_per_prompt(len(chosen), self.ranking) - len(labelled)
        pairs = pairs[:target]
        if not pairs:
            raise HarnessError(f"{self.name}: the accepted samples of every prompt tied under the reward; no pair to "
                               f"train on (raise candidates or rejection_beta, or use another reward)")
        train = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in pairs]
        sub_job = TrainingJob(start_checkpoint=job.start_checkpoint, output_dir=job.output_dir,
                              data={"train": train, "heldout": []}, budget=replace(job.budget, pairs=len(train)),
                              seed=job.seed, scratch_dir=job.scratch_dir / "dpo",
                              reference_cache_dir=job.reference_cache_dir)
        outcome = DPO(name=self.name, beta=self.gamma, learning_rate=self.learning_rate,
                      loss_type=self.loss_type).train(sub_job)
        shutil.rmtree(job.scratch_dir, ignore_errors=True)

        from transformers import AutoConfig

        parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
        reward_tokens = reward.tokens_scored - reward_before
        reference_tokens = outcome.reference_tokens + sampler.tokens + reward_tokens * reward.parameters / parameters
        candidate_sum, accepted_sum = statistics.pop("candidate_reward_sum"), statistics.pop("accepted_reward_sum")
        extra = {**outcome.extra, **statistics, "pairs_labelled": len(pairs),
                 "dpo_reference_tokens": outcome.reference_tokens,
                 "mean_candidate_reward": candidate_sum / statistics["distinct_candidates"],
                 "mean_accepted_reward": accepted_sum / statistics["accepted"],
                 "mean_chosen_reward": sum(p["chosen_reward"] for p in pairs) / len(pairs),
                 "mean_rejected_reward": sum(p["rejected_reward"] for p in pairs) / len(pairs),
                 "generation_tokens": sampler.tokens, "reward_tokens": reward_tokens,
                 "reward_parameters": reward.parameters,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", "reward": reward_record(reward)}
        return replace(outcome, reference_tokens=round(reference_tokens), extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# the paper's sampling and ranking, as pure functions


def statistical_rejection_sampling(rewards: list[float], num_samples: int, beta: float,
                                   uniform: Callable[[], float]) -> list[int]:
    """Algorithm 1 of Liu et al. 2023 (Appendix A.1): indices of ``num_samples`` distinct candidates, in the order
    accepted, drawn from π_r ∝ π_sft·exp(r/β) given candidates sampled from π_sft.

    Candidates are visited in order, in passes; each pass first sets r_max = the highest reward among the candidates
    not yet accepted, then accepts candidate y when u < exp((r(x,y) − r_max)/β) with u = ``uniform()`` ~ U[0, 1)
    (eq. 14: π_r(y|x) / (M·π_sft(y|x)) with M estimated from the samples). The best remaining candidate is always
    accepted, so each pass accepts at least one; sampling stops as soon as ``num_samples`` are accepted. ``beta`` = 0
    is the limit β → 0: only candidates at r_max are accepted (top-k over N).
    """
    if not 0 <= num_samples <= len(rewards):
        raise ValueError(f"cannot accept {num_samples} of {len(rewards)} candidates")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        highest = max(rewards[i] for i in remaining)
        taken = []
        for index in remaining:
            gap = rewards[index] - highest
            probability = math.exp(gap / beta) if beta > 0 else float(gap == 0)
            if uniform() >= probability:
                continue
            accepted.append(index)
            taken.append(index)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def games_per_prompt(accepted: int, ranking: str) -> int:
    """Pairs ``rank_pairs`` forms from ``accepted`` samples before dropping ties: n // 2 first-round, n − 1 tournament."""
    return accepted // 2 if ranking == "first-round" else max(accepted - 1, 0)


def rank_pairs(rewards: list[float], ranking: str = "first-round") -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of the accepted samples, labelled by reward (higher chosen), ties dropped.

    ``first-round``: (0, 1), (2, 3), ... in acceptance order — the paper's "first-round-rank" (§5.2: n/2 pairs).
    ``tournament``: the winners of each round meet again until one is left — "tournament-rank" (n − 1 games); a
    sample without an opponent advances unplayed, and a tie advances the first of the two (the game gives no pair).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r}; choose one of {', '.join(RANKINGS)}")
    pairs: list[tuple[int, int]] = []
    level = list(range(len(rewards)))
    while len(level) > 1:
        advancing = []
        for position in range(0, len(level) - 1, 2):
            a, b = level[position], level[position + 1]
            if rewards[a] != rewards[b]:
                pairs.append((a, b) if rewards[a] > rewards[b] else (b, a))
            advancing.append(a if rewards[a] >= rewards[b] else b)
        if len(level) % 2:
            advancing.append(level[-1])
        if ranking == "first-round":
            break
        level = advancing
    return pairs
