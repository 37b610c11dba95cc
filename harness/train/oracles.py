"""Preference oracles of self-play methods: who says which of a prompt's K samples beats which.

``RewardOracle`` turns the sweep's reward into P[i][j] = σ(r_i − r_j) (Bradley–Terry); ``JudgeOracle`` asks a
pairwise judge (``harness.evaluate.judges``); ``preference_oracle`` picks one for a method's config.
``self_play_labeller`` makes a round's (winner, loser) pairs from either (SPPO, Wu et al. 2024, arXiv:2405.00675;
``rso`` uses the judge oracle); ``self_play_outcome`` is what a method trained in rounds against an oracle (``sppo``,
``dno``) reports.
"""

from __future__ import annotations

import math

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


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
    (``harness.evaluate.judges``; both presentation orders averaged, so P[j][i] = 1 − P[i][j]). Each unordered pair is judged
    once; identical samples are a draw (½) without asking. Returns (matrices, the judgments made)."""
    from harness.train.feedback import conversation_text

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


def winner_pairs(prompts: list, samples: list[list[str]], matrices) -> tuple[list[dict], list[float], list[float]]:
    """Per prompt, the (winner, loser) pair by mean win probability P̂(y_i ≻ π) over its K samples (no pair when they
    all tie), and the winners' and losers' P̂: what every self-play round trains on."""
    from harness.train.rounds import best_and_worst

    pairs, winners, losers = [], [], []
    for prompt, candidates, matrix in zip(prompts, samples, matrices):
        wins = mean_win_probabilities(matrix)
        picked = best_and_worst(wins)
        if picked is None:
            continue
        pairs.append({"prompt": prompt, "chosen": candidates[picked[0]], "rejected": candidates[picked[1]]})
        winners.append(wins[picked[0]])
        losers.append(wins[picked[1]])
    return pairs, winners, losers


def self_play_labeller(sampler, oracle, samples: int, seed: int):
    """``label(path, prompts, round_number)`` for ``train_in_rounds``: K samples per prompt, win probabilities from
    the oracle's K×K matrix, (winner, loser) pairs."""
    from harness.train.rounds import round_seed

    def label(path, prompts: list, round_number: int) -> tuple[list[dict], dict]:
        texts = sampler.samples(path, prompts, samples, seed=round_seed(seed, round_number, samples))
        matrices = oracle.matrices(prompts, texts)
        pairs, winners, losers = winner_pairs(prompts, texts, matrices)
        statistics = {"winner_win_probability": sum(winners) / len(winners) if winners else None,
                      "loser_win_probability": sum(losers) / len(losers) if losers else None}
        return pairs, {**statistics, **oracle.round_statistics()}

    return label


class RewardOracle:
    """P[i][j] = σ(r_i − r_j) from the sweep's reward (``harness.train.rewards``)."""

    def __init__(self, reward):
        self.reward, self.before, self.last_mean = reward, reward.tokens_scored, None

    def matrices(self, prompts: list, samples: list[list[str]]) -> list[list[list[float]]]:
        from harness.train.rounds import score_samples

        scores = score_samples(self.reward, prompts, samples)
        self.last_mean = sum(map(sum, scores)) / sum(len(s) for s in scores)
        return [bradley_terry_matrix(values) for values in scores]

    def round_statistics(self) -> dict:
        return {"reward": self.last_mean}

    def tokens(self) -> int:
        return self.reward.tokens_scored - self.before

    def policy_equivalent_tokens(self, parameters: int) -> float:
        return self.tokens() * self.reward.parameters / parameters

    def record(self, parameters: int) -> dict:
        from harness.train.rewards import reward_record

        return {"oracle": "reward (Bradley-Terry link)", "reward_tokens": self.tokens(),
                "reward_parameters": self.reward.parameters, "reward": reward_record(self.reward)}


class JudgeOracle:
    """P[i][j] from a pairwise judge (``harness.evaluate.judges``), each unordered pair judged once in both orders."""

    def __init__(self, config: dict, job: TrainingJob, name: str):
        import torch

        from harness.evaluate.judges import build_judge

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.judge = build_judge(config, device=device, batch_size=job.plan.sequence_batch,
                                 config_key=f"method_params.{name}.judge", cache_dir=job.cache_root)
        self.judge_tokens, self.judgments, self.consistent = 0, 0, []

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list:
        """The judge's ``judge_batch``, its judgments and prompt tokens counted (also used by ``methods/rso.py``)."""
        from harness.train.feedback import judged_prompt_tokens

        judgments = self.judge.judge_batch(items) if items else []
        self.judge_tokens += judged_prompt_tokens(judgments)
        self.judgments += len(judgments)
        return judgments

    def matrices(self, prompts: list, samples: list[list[str]]) -> list[list[list[float]]]:
        from harness.train.oracles import judged_win_matrices

        matrices, judgments = judged_win_matrices(self, prompts, samples)
        self.consistent = [float(j.consistent(0.0)) for j in judgments]
        return matrices

    def round_statistics(self) -> dict:
        return {"judge_position_consistency": sum(self.consistent) / len(self.consistent) if self.consistent else None}

    def parameters(self) -> int:
        """The judge model's parameters (0 for an API judge, or before any judgment)."""
        if not self.judgments or not hasattr(self.judge, "load"):
            return 0
        return sum(p.numel() for p in self.judge.load()[0].parameters())

    def policy_equivalent_tokens(self, parameters: int) -> float:
        return self.judge_tokens * self.parameters() / parameters

    def record(self, parameters: int) -> dict:
        return {"oracle": "judge", "judge": self.judge.identity(), "judge_tokens": self.judge_tokens,
                "judge_parameters": self.parameters(), "judgments": self.judgments}


def preference_oracle(judge: dict | None, job: TrainingJob, name: str):
    """The oracle of a self-play method ``name``: its ``judge`` config when it names one, else the sweep's reward
    (an error in one line when the job carries none)."""
    if judge:
        return JudgeOracle(judge, job, name)
    if job.reward is None:
        raise HarnessError(f"{name} needs a preference oracle: set reward=<name> (conf/reward/) or "
                           f"+method_params.{name}.judge.type=<judge type>")
    return RewardOracle(job.reward)


def self_play_outcome(rounds, sampler, oracle, extra: dict) -> TrainingOutcome:
    """What a method trained in rounds (``harness.train.rounds.train_in_rounds``) against a preference oracle reports:
    the rounds' summary, the samples generated, ``extra`` (its own per-round keys), the oracle's record and, with the
    reward oracle, each round's mean sample reward. Reference tokens, in policy-parameter equivalents
    (``methods/ppo.py``): the rounds' reference scoring, the generation and the oracle's reading."""
    record = {**rounds.summary(), "generation_tokens": sampler.tokens, **extra,
              "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", **oracle.record(rounds.parameters)}
    if isinstance(oracle, RewardOracle):
        record["train_rewards"] = [h["reward"] for h in rounds.trained]
    reference_tokens = (rounds.totals["reference_tokens"] + sampler.tokens
                        + oracle.policy_equivalent_tokens(rounds.parameters))
    return rounds.outcome(reference_tokens=reference_tokens, extra=record)
