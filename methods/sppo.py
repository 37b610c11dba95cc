"""SPPO — Self-Play Preference Optimization (Wu et al. 2024, arXiv:2405.00675), iterative, with TRL's ``sppo_hard``
loss.

Each round t = 1..``rounds`` on a fresh chunk of the budget's prompts (``methods/iterative_dpo.py``'s loop,
``train_in_rounds``):

1. **self-play**: sample K = ``samples`` responses y_1..y_K per prompt from the current policy π_t (Algorithm 1,
   line 3; the authors' scripts: K = 5 at temperature 0.7);
2. **preference oracle**: P[i][j] = P(y_i ≻ y_j | x), by default from the sweep's reward through a Bradley–Terry link,
   σ(r_i − r_j) (``bradley_terry_matrix``; the authors turn PairRM scores into probabilities the same way), or
   from a pairwise judge (``judge:``, a ``harness.judges`` config: both presentation orders averaged);
3. **win probability** of each response against the policy, P̂(y_i ≻ π_t | x) = (1/K) Σ_j P[i][j]
   (``mean_win_probabilities``, Algorithm 1); the response with the highest estimate is the winner y_w, the
   lowest the loser y_l (as the authors' ``compute_prob.py``); a prompt whose estimates all tie gives no pair;
4. **update** with TRL's ``DPOTrainer(loss_type="sppo_hard")`` from π_t, the reference being π_t (the previous
   round's policy):  L = (log π_θ(y_w|x)/π_t(y_w|x) − η/2)² + (log π_θ(y_l|x)/π_t(y_l|x) + η/2)²,  η = 1/β —
   eq. 4.7 of Algorithm 1 with the hard labels P̂(y_w ≻ π_t) = 1, P̂(y_l ≻ π_t) = 0, the practical variant TRL
   implements (the paper's soft targets η(P̂ − ½) would need a per-pair target TRL's loss does not take).

With the reward oracle the held-out stopping rule of ``iterative_dpo`` applies (greedy completions of the first
``heldout_prompts`` held-out prompts scored by the reward; stop when a round does not improve by more than
``min_improvement``; keep the best round). With a judge oracle there is no scalar yardstick: every round runs and
the last is kept, as in the paper.

**Budget** and **tokens / FLOPs** as ``iterative_dpo`` (policy-parameter equivalents, see ``methods/ppo.py``): the
DPO-style rounds' own counts plus, forward-only, generation tokens (K samples per prompt, plus the held-out
completions) and reward-model tokens × N_reward/N; a local judge's tokens × N_judge/N (``local_hf``: its prompts, K(K−1)/2
comparisons × 2 orders per prompt; ``reward_model``: both sequences of each comparison). An API judge's tokens are not
local compute and are not counted. ``visit_cost``, ``run_cost`` and ``visit_granularity`` are
the same sums per prompt for ``budget.match=tokens|flops`` (``harness.matching``; a judge estimated as policy-sized).
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from methods.iterative_dpo import bradley_terry_matrix, mean_win_probabilities


class SPPO:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True

    def __init__(self, name: str = "sppo", rounds: int = 3, samples: int = 5, beta: float = 0.001,
                 learning_rate: float = 5e-7, temperature: float = 0.7, heldout_prompts: int = 32,
                 min_improvement: float = 0.0, judge: dict | None = None):
        from harness.judges import checked_judge_config
        from methods.iterative_dpo import check_rounds

        check_rounds(name, rounds, samples)
        self.name = name
        self.rounds = rounds
        self.samples = samples
        self.beta = beta
        self.learning_rate = learning_rate
        self.temperature = temperature
        self.heldout_prompts = heldout_prompts
        self.min_improvement = min_improvement
        self.judge = checked_judge_config(judge, f"method_params.{name}.judge")
        self.needs_reward = self.judge is None  # the oracle is the sweep's reward unless a judge is named

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in ("rounds", "samples", "beta", "learning_rate", "temperature",
                                              "heldout_prompts", "min_improvement", "judge")}

    # cost model for budget.match=tokens|flops (harness.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One prompt in its round: K samples generated and read by the oracle (the reward: K sequences × N_reward/N; a
        judge: every pair in both orders, estimated as a policy-sized local judge), then one (winner, loser) pair
        trained and scored by the round's reference."""
        from methods.iterative_dpo import judged_visit_tokens

        sequence = prompt_tokens + completion_tokens
        generated = self.samples * sequence
        oracle = (generated * sizes.reward_share if self.judge is None
                  else judged_visit_tokens(self.samples, prompt_tokens, completion_tokens))
        return 2.0 * sequence, generated + oracle + 2.0 * sequence

    def run_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes,
                 heldout_prompts: int) -> tuple[float, float]:
        """Reward oracle: the stopping rule's greedy held-out completions, scored (as ``iterative_dpo``)."""
        if self.judge is not None:
            return 0.0, 0.0
        from methods.iterative_dpo import heldout_evaluation_cost

        return heldout_evaluation_cost(self.rounds, min(self.heldout_prompts, heldout_prompts), prompt_tokens,
                                       completion_tokens, sizes)

    def visit_granularity(self, budget) -> tuple[int, int]:
        from methods.iterative_dpo import rounds_granularity

        return rounds_granularity(self.rounds, budget)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from methods.dpo import DPO
        from methods.iterative_dpo import Sampler, heldout_reward, train_in_rounds

        reward = job.reward
        if self.judge is None and reward is None:
            raise HarnessError(f"{self.name} needs a preference oracle: set reward=<name> (conf/reward/) or "
                               f"+method_params.{self.name}.judge.type=<judge type>")
        sampler = Sampler(job.budget, self.temperature)
        oracle = JudgeOracle(self.judge, job, self.name) if self.judge else RewardOracle(reward)
        label = self_play_labeller(sampler, oracle, self.samples, job.seed)
        heldout = None if self.judge else (lambda path, prompts: heldout_reward(sampler, reward, path, prompts))
        rounds = train_in_rounds(job, name=self.name, rounds=self.rounds, label=label,
                                 round_method=DPO(beta=self.beta, learning_rate=self.learning_rate,
                                                  loss_type="sppo_hard"),
                                 heldout_score=heldout, heldout_prompts=self.heldout_prompts,
                                 min_improvement=self.min_improvement)
        extra = {**rounds.summary(), "generation_tokens": sampler.tokens,
                 "winner_win_probabilities": [h["winner_win_probability"] for h in rounds.trained],
                 "loser_win_probabilities": [h["loser_win_probability"] for h in rounds.trained],
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", **oracle.record(rounds.parameters)}
        if self.judge is None:
            extra["train_rewards"] = [h["reward"] for h in rounds.trained]
        reference_tokens = rounds.totals["reference_tokens"] + sampler.tokens + oracle.policy_equivalent_tokens(
            rounds.parameters)
        return rounds.outcome(reference_tokens=reference_tokens, extra=extra)


def self_play_labeller(sampler, oracle, samples: int, seed: int):
    """``label(path, prompts, round_number)`` for ``train_in_rounds``: K samples per prompt, win probabilities from
    the oracle's K×K matrix, (winner, loser) pairs."""
    from methods.iterative_dpo import best_and_worst, round_seed

    def label(path, prompts: list, round_number: int) -> tuple[list[dict], dict]:
        texts = sampler.samples(path, prompts, samples, seed=round_seed(seed, round_number, samples))
        matrices = oracle.matrices(prompts, texts)
        pairs, winners, losers = [], [], []
        for prompt, candidates, matrix in zip(prompts, texts, matrices):
            wins = mean_win_probabilities(matrix)
            picked = best_and_worst(wins)
            if picked is None:
                continue
            pairs.append({"prompt": prompt, "chosen": candidates[picked[0]], "rejected": candidates[picked[1]]})
            winners.append(wins[picked[0]])
            losers.append(wins[picked[1]])
        statistics = {"winner_win_probability": sum(winners) / len(winners) if winners else None,
                      "loser_win_probability": sum(losers) / len(losers) if losers else None}
        return pairs, {**statistics, **oracle.round_statistics()}

    return label


class RewardOracle:
    """P[i][j] = σ(r_i − r_j) from the sweep's reward (``harness.rewards``)."""

    def __init__(self, reward):
        self.reward, self.before, self.last_mean = reward, reward.tokens_scored, None

    def matrices(self, prompts: list, samples: list[list[str]]) -> list[list[list[float]]]:
        from methods.iterative_dpo import score_samples

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
        from harness.rewards import reward_record

        return {"oracle": "reward (Bradley-Terry link)", "reward_tokens": self.tokens(),
                "reward_parameters": self.reward.parameters, "reward": reward_record(self.reward)}


class JudgeOracle:
    """P[i][j] from a pairwise judge (``harness.judges``), each unordered pair judged once in both orders."""

    def __init__(self, config: dict, job: TrainingJob, name: str):
        import torch

        from harness.judges import build_judge

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.judge = build_judge(config, device=device, batch_size=2 * job.budget.micro_batch_pairs,
                                 config_key=f"method_params.{name}.judge")
        self.judge_tokens, self.judgments, self.consistent = 0, 0, []

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list:
        """The judge's ``judge_batch``, its judgments and prompt tokens counted (also used by ``methods/rso.py``)."""
        from harness.feedback import judged_prompt_tokens

        judgments = self.judge.judge_batch(items) if items else []
        self.judge_tokens += judged_prompt_tokens(judgments)
        self.judgments += len(judgments)
        return judgments

    def matrices(self, prompts: list, samples: list[list[str]]) -> list[list[list[float]]]:
        from methods.iterative_dpo import judged_win_matrices

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
