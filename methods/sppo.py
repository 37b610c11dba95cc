"""SPPO — Self-Play Preference Optimization (Wu et al. 2024, arXiv:2405.00675), iterative, with TRL's ``sppo_hard``
loss.

Each round t = 1..``rounds`` on a fresh chunk of the budget's prompts (``methods/iterative_dpo.py``'s loop,
``train_in_rounds``):

1. **self-play**: sample K = ``samples`` responses y_1..y_K per prompt from the current policy π_t (Algorithm 1,
   line 3; the authors' scripts: K = 5 at temperature 0.7);
2. **preference oracle**: P[i][j] = P(y_i ≻ y_j | x), by default from the sweep's reward through a Bradley–Terry link,
   σ(r_i − r_j) (``bradley_terry_matrix``; the authors turn PairRM scores into probabilities the same way), or
   from a pairwise judge (``judge:``, a ``harness.evaluate.judges`` config: both presentation orders averaged);
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
the same sums per prompt for ``budget.match=tokens|flops`` (``harness.train.matching``; a judge estimated as policy-sized).
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import PairwiseRound
from harness.train.oracles import preference_oracle, self_play_labeller, self_play_outcome


class SPPO:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True

    def __init__(self, name: str = "sppo", rounds: int = 3, samples: int = 5, beta: float = 0.001,
                 learning_rate: float = 5e-7, temperature: float = 0.7, heldout_prompts: int = 32,
                 min_improvement: float = 0.0, judge: dict | None = None):
        from harness.evaluate.judges import checked_judge_config
        from harness.train.rounds import check_rounds

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


    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One prompt in its round: K samples generated and read by the oracle (the reward: K sequences × N_reward/N; a
        judge: every pair in both orders, estimated as a policy-sized local judge), then one (winner, loser) pair
        trained and scored by the round's reference."""
        from harness.train.rounds import judged_visit_tokens

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
        from harness.train.rounds import heldout_evaluation_cost

        return heldout_evaluation_cost(self.rounds, min(self.heldout_prompts, heldout_prompts), prompt_tokens,
                                       completion_tokens, sizes)

    def visit_granularity(self, budget) -> tuple[int, int]:
        from harness.train.rounds import rounds_granularity

        return rounds_granularity(self.rounds, budget)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.rounds import Sampler, heldout_reward, train_in_rounds

        oracle = preference_oracle(self.judge, job, self.name)
        sampler = Sampler(job.plan, self.temperature, engine=job.engine)
        label = self_play_labeller(sampler, oracle, self.samples, job.seed)
        heldout = None if self.judge else (lambda path, prompts: heldout_reward(sampler, job.reward, path, prompts))
        rounds = train_in_rounds(job, name=self.name, rounds=self.rounds, label=label,
                                 round_method=PairwiseRound(beta=self.beta, learning_rate=self.learning_rate,
                                                  loss_type="sppo_hard"),
                                 heldout_score=heldout, heldout_prompts=self.heldout_prompts,
                                 min_improvement=self.min_improvement)
        return self_play_outcome(rounds, sampler, oracle, {
            "winner_win_probabilities": [h["winner_win_probability"] for h in rounds.trained],
            "loser_win_probabilities": [h["loser_win_probability"] for h in rounds.trained]})
