"""RSO — Statistical Rejection Sampling Optimization (Liu et al. 2023, "Statistical rejection sampling improves
preference optimization", arXiv:2309.06657).

DPO fits the optimal policy of the KL-constrained reward objective, π_r(y|x) ∝ π_sft(y|x)·exp(r(x,y)/β) (eq. 4),
on pairs drawn from whatever policies wrote the data. RSO draws its pairs from (an estimate of) π_r itself:

1. **sample** ``candidates`` completions per prompt from the starting checkpoint π_sft (``harness.evaluate.generation``,
   temperature ``temperature``, the ``top_k`` likeliest tokens; the paper: 64 at temperature 0.7, top-k 40);
2. **score** them with the sweep's reward ``job.reward`` (``conf/reward/``), or — with ``judge:`` (a ``harness.evaluate.judges``
   config, both presentation orders averaged) — with a pairwise preference model, as the paper's reward-ranking
   model ρψ(x, y1, y2) is pairwise: a pointwise score is induced against an anchor response y_a,
   r(x, y) = logit P(y ≻ y_a | x) (``anchored_rewards``; P clipped to [1e-6, 1 − 1e-6]); the anchor is the data's
   chosen response of that prompt (the harness's choice; the scale is the paper's, logits of a preference
   probability, so ``rejection_beta`` keeps its meaning);
3. **rejection-sample** ``accepted`` distinct ones by Algorithm 1 (``statistical_rejection_sampling``): accept y with
   probability exp((r(x,y) − r_max)/β) (eqs. 13–14, Theorem 1), r_max the highest reward not yet accepted — which
   turns samples of π_sft into samples of π_r; β → 0 keeps the top-k, β → ∞ accepts everything;
4. **pair** the accepted samples and label each pair by the reward, or with ``judge:`` by the pair's own preference,
   P(y_i ≻ y_j | x) from the judge (``rank_pairs``): ``first-round`` pairs
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
With ``judge:`` the judge's tokens × N_judge/N take the reward model's place (``local_hf`` and ``reward_model``
judges report what they read; an API judge's tokens are not local compute and are not counted, as
``methods/sppo.py``); ``visit_cost`` estimates a policy-sized local judge: each
candidate judged against the anchor and each game judged, both orders.
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
from harness.train.processes import broadcast_from_first, process_group
from harness.train.pairwise import PairwiseRound

LOSSES = ("hinge", "sigmoid")
RANKINGS = ("first-round", "tournament")


class RSO:
    data_view = "pairs"        # only the prompts are used
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "rso", loss_type: str = "hinge", gamma: float = 0.05, rejection_beta: float = 0.5,
                 candidates: int = 64, accepted: int = 8, ranking: str = "first-round", temperature: float = 0.7,
                 top_k: int | None = 40, learning_rate: float = 5e-7, judge: dict | None = None):
        where = f"{name} (conf/method/rso.yaml)"
        if loss_type not in LOSSES:
            raise HarnessError(f"{where}: loss_type={loss_type!r}; choose one of {', '.join(LOSSES)}")
        if ranking not in RANKINGS:
            raise HarnessError(f"{where}: ranking={ranking!r}; choose one of {', '.join(RANKINGS)}")
        if not 2 <= accepted <= candidates:
            raise HarnessError(f"{where}: need 2 ≤ accepted ≤ candidates; got accepted={accepted}, "
                               f"candidates={candidates}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise HarnessError(f"{where}: top_k={top_k!r} must be a positive number of tokens or null (no limit)")
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
        self.top_k = top_k
        self.learning_rate = learning_rate
        from harness.evaluate.judges import checked_judge_config

        self.judge = checked_judge_config(judge, f"method_params.{name}.judge")
        self.needs_reward = self.judge is None  # a judge labels instead of the sweep's reward


    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One labelled pair: its share of a prompt's candidates generated and scored by the reward, then one DPO
        pair (both sequences trained and scored by the reference). Ties (no pair) make a pair dearer."""
        sequence = prompt_tokens + completion_tokens
        share = self.candidates / games_per_prompt(self.accepted, self.ranking)  # candidates per labelled pair
        if self.judge is None:
            return 2.0 * sequence, 2.0 * sequence + share * sequence * (1.0 + sizes.reward_share)
        from harness.train.rounds import JUDGE_PROMPT_TOKENS

        comparison = 2 * (JUDGE_PROMPT_TOKENS + prompt_tokens + 2 * completion_tokens)  # both orders
        return 2.0 * sequence, 2.0 * sequence + share * (sequence + comparison) + comparison

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.rewards import parameter_count, reward_record
        from harness.train.rounds import Sampler, round_seed, score_samples

        from harness.train.oracles import JudgeOracle

        reward = job.reward
        if reward is None and self.judge is None:
            raise HarnessError(f"{self.name} needs a reward to rejection-sample with: set reward=<name> (conf/reward/) "
                               f"or +method_params.{self.name}.judge.type=<judge type>")
        oracle = JudgeOracle(self.judge, job, self.name) if self.judge else None
        target = len(job.plan.rows)
        prompts = [row["prompt"] for row in job.plan.rows]
        anchors = [row["chosen"] for row in job.plan.rows]
        per_prompt = games_per_prompt(self.accepted, self.ranking)
        sampler = Sampler(job.plan, self.temperature, self.top_k, engine=job.engine)
        reward_before = reward.tokens_scored if oracle is None else 0
        uniform = random.Random(job.seed).random
        pairs: list[dict] = []
        statistics = {"prompts_sampled": 0, "candidates": 0, "distinct_candidates": 0, "accepted": 0,
                      "candidate_reward_sum": 0.0, "accepted_reward_sum": 0.0, "ties_dropped": 0}
        position, chunk_number = 0, 0
        while len(pairs) < target and position < len(prompts):
            chunk_number += 1
            size = math.ceil((target - len(pairs)) / per_prompt)
            chunk, chunk_anchors = prompts[position: position + size], anchors[position: position + size]
            position += len(chunk)
            samples = sampler.samples(job.start_checkpoint, chunk, self.candidates,
                                      seed=round_seed(job.seed, chunk_number, self.candidates))
            scored = (score_samples(reward, chunk, samples) if oracle is None
                      else anchored_rewards(oracle, chunk, chunk_anchors, samples))
            for prompt, sampled, scores in zip(chunk, samples, scored):
                distinct = dict(zip(sampled, scores))  # Algorithm 1 draws distinct responses (a dict of candidates)
                texts, values = list(distinct), list(distinct.values())
                chosen = statistical_rejection_sampling(values, min(self.accepted, len(texts)), self.rejection_beta,
                                                        uniform)
                accepted_rewards = [values[i] for i in chosen]
                games = None if oracle is None else judged_games(oracle, prompt, [texts[i] for i in chosen])
                labelled = rank_pairs(accepted_rewards, self.ranking, games)
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
            raise HarnessError(f"{self.name}: the accepted samples of every prompt tied under the reward or judge; no "
                               f"pair to train on (raise candidates or rejection_beta, or use another reward or judge)")
        # many processes (harness.run.launch): every process sampled; all train on rank 0's pairs, its counts are kept
        train = broadcast_from_first([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in pairs],
                                     process_group()[1])
        sub_job = TrainingJob(start_checkpoint=job.start_checkpoint, output_dir=job.output_dir,
                              plan=job.plan.for_rows(train), seed=job.seed, scratch_dir=job.scratch_dir / "dpo",
                              reference_cache_dir=job.reference_cache_dir)
        outcome = PairwiseRound(beta=self.gamma, learning_rate=self.learning_rate,
                                loss_type=self.loss_type).train(sub_job)
        if process_group()[0] == 0:
            shutil.rmtree(job.scratch_dir, ignore_errors=True)

        from transformers import AutoConfig

        parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
        if oracle is None:
            reward_tokens = reward.tokens_scored - reward_before
            labeller = {"labels": "reward", "reward_tokens": reward_tokens, "reward_parameters": reward.parameters,
                        "reward": reward_record(reward)}
            oracle_tokens = reward_tokens * reward.parameters / parameters
        else:
            labeller = {"labels": "judge (rewards: logit P(candidate ≻ the data's chosen response))",
                        **oracle.record(parameters)}
            oracle_tokens = oracle.policy_equivalent_tokens(parameters)
        reference_tokens = outcome.reference_tokens + sampler.tokens + oracle_tokens
        candidate_sum, accepted_sum = statistics.pop("candidate_reward_sum"), statistics.pop("accepted_reward_sum")
        extra = {**outcome.extra, **statistics, "pairs_labelled": len(pairs),
                 "dpo_reference_tokens": outcome.reference_tokens,
                 "mean_candidate_reward": candidate_sum / statistics["distinct_candidates"],
                 "mean_accepted_reward": accepted_sum / statistics["accepted"],
                 "mean_chosen_reward": sum(p["chosen_reward"] for p in pairs) / len(pairs),
                 "mean_rejected_reward": sum(p["rejected_reward"] for p in pairs) / len(pairs),
                 "generation_tokens": sampler.tokens, **labeller,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)"}
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


def rank_pairs(rewards: list[float], ranking: str = "first-round",
               games: Callable[[list[tuple[int, int]]], list[float]] | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of the accepted samples, labelled by reward (higher chosen), ties dropped.

    ``first-round``: (0, 1), (2, 3), ... in acceptance order — the paper's "first-round-rank" (§5.2: n/2 pairs).
    ``tournament``: the winners of each round meet again until one is left — "tournament-rank" (n − 1 games); a
    sample without an opponent advances unplayed, and a tie advances the first of the two (the game gives no pair).
    ``games``, when given, decides instead of the rewards: it takes a level's games [(a, b), ...] and returns
    P(a ≻ b) for each (a pairwise judge); P > ½ makes a the winner, P < ½ b, P = ½ is a tie.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r}; choose one of {', '.join(RANKINGS)}")
    pairs: list[tuple[int, int]] = []
    level = list(range(len(rewards)))
    while len(level) > 1:
        advancing = []
        played = [(level[position], level[position + 1]) for position in range(0, len(level) - 1, 2)]
        outcomes = (games(played) if games is not None
                    else [0.5 + 0.5 * ((rewards[a] > rewards[b]) - (rewards[a] < rewards[b])) for a, b in played])
        for (a, b), p_a in zip(played, outcomes):
            if p_a != 0.5:
                pairs.append((a, b) if p_a > 0.5 else (b, a))
            advancing.append(a if p_a >= 0.5 else b)
        if len(level) % 2:
            advancing.append(level[-1])
        if ranking == "first-round":
            break
        level = advancing
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# a pairwise judge in the reward's place


def anchored_rewards(oracle, prompts: list, anchors: list[str], samples: list[list[str]]) -> list[list[float]]:
    """Per prompt, r(x, y) = logit P(y ≻ y_a | x) of every sample y against the anchor y_a, P from the pairwise judge
    (``oracle.judge_batch``, both orders averaged) clipped to [1e-6, 1 − 1e-6]; each distinct sample judged once."""
    from harness.train.feedback import conversation_text

    items, where = [], []
    for p, (prompt, anchor, texts) in enumerate(zip(prompts, anchors, samples)):
        for text in dict.fromkeys(texts):
            items.append((conversation_text(prompt), text, anchor))
            where.append((p, text))
    probability = {key: judgment.probability for key, judgment in zip(where, oracle.judge_batch(items))}
    return [[logit(probability[(p, text)]) for text in texts] for p, texts in enumerate(samples)]


def judged_games(oracle, prompt, texts: list[str]) -> Callable[[list[tuple[int, int]]], list[float]]:
    """``rank_pairs``' ``games`` for one prompt's accepted ``texts``: each level's games judged in one batch."""
    from harness.train.feedback import conversation_text

    def games(played: list[tuple[int, int]]) -> list[float]:
        judgments = oracle.judge_batch([(conversation_text(prompt), texts[a], texts[b]) for a, b in played])
        return [judgment.probability for judgment in judgments]

    return games


def logit(probability: float, floor: float = 1e-6) -> float:
    p = min(max(probability, floor), 1.0 - floor)
    return math.log(p / (1.0 - p))
