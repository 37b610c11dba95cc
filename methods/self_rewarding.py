"""Self-rewarding language models (Yuan et al. 2024, arXiv:2401.10020): iterative DPO in which the current policy
judges its own samples by LLM-as-a-judge prompting, instead of an external reward.

Each round r = 1..``rounds`` on a fresh chunk of the budget's prompts (``methods/iterative_dpo.py``'s loop,
``train_in_rounds``):

1. **generate** ``samples`` (N) completions per prompt from the current policy M_{r−1} (temperature
   ``temperature``; the paper samples N = 4 candidates at T = 0.7);
2. **self-judge**: M_{r−1} itself, loaded as the harness's ``local_hf`` judge (``harness.evaluate.judges.LocalHFJudge``: the
   pairwise judging prompt through the policy's chat template, p("1") from the "1"/"2" next-token logits, both
   presentation orders averaged), compares every pair of a prompt's samples; a sample's score is its mean win
   probability against the N samples (``mean_win_probabilities``, the diagonal ½ included);
3. **pairs**: the highest-scoring sample is chosen, the lowest rejected; a prompt whose samples all score the same
   gives no pair (the paper discards pairs with equal scores);
4. **DPO** (Rafailov et al. 2023, eq. 7) from M_{r−1} with π_ref = M_{r−1}, giving M_r.

Every round runs and the last policy is kept: self-rewarding has no external yardstick for a stopping rule
(the paper, too, trains M1 → M2 → M3 and evaluates each outside the loop).

**Deviation from the paper**: the paper's judge scores each response alone on an additive 5-point rubric, sampled
3 times and averaged; the harness's judges are pairwise (the win-rate task's), so the policy ranks its samples by
pairwise comparisons instead — the same judge machinery, prompt and both-orders averaging as ``win_rate``. The
paper also first fine-tunes on judging examples (EFT); here the starting checkpoint judges as it is.

**Budget**: as ``iterative_dpo`` — the budget's prompts split evenly over the rounds, each chunk ≥
``budget.batch_pairs`` prompts, so all rounds take at most the optimizer steps of one DPO pass over the budget's
pairs. **Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): the DPO rounds' own counts plus,
forward-only, the generation tokens and the judge's prompt tokens (N(N−1)/2 comparisons × 2 orders per prompt;
the judge is the policy, so its tokens count one for one). ``extra`` records per-round pairs, the mean score gap
between chosen and rejected and the self-judge's position consistency. ``visit_cost`` and ``visit_granularity`` are
the same sums per prompt for ``budget.match=tokens|flops`` (``harness.train.matching``).
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import PairwiseRound


class SelfRewarding:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = False       # the policy is its own judge

    def __init__(self, name: str = "self_rewarding", rounds: int = 3, samples: int = 4, beta: float = 0.1,
                 learning_rate: float = 1e-6, temperature: float = 0.7, max_output_chars: int | None = 1000):
        from harness.train.rounds import check_rounds

        check_rounds(name, rounds, samples)
        self.name = name
        self.rounds = rounds
        self.samples = samples
        self.beta = beta
        self.learning_rate = learning_rate
        self.temperature = temperature
        self.max_output_chars = max_output_chars


    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One prompt in its round: N samples generated, every pair judged by the policy in both orders (judging
        prompt ≈ ``JUDGE_PROMPT_TOKENS`` + prompt + two samples), then one DPO pair trained and referenced."""
        from harness.train.rounds import judged_visit_tokens

        sequence = prompt_tokens + completion_tokens
        judged = judged_visit_tokens(self.samples, prompt_tokens, completion_tokens)
        return 2.0 * sequence, self.samples * sequence + judged + 2.0 * sequence

    def visit_granularity(self, budget) -> tuple[int, int]:
        from harness.train.rounds import rounds_granularity

        return rounds_granularity(self.rounds, budget)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        import torch

        from harness.train.feedback import judged_prompt_tokens
        from harness.evaluate.judges import JUDGE_PROMPT, LOCAL_ANSWER_PREFIX, LocalHFJudge
        from harness.train.rounds import Sampler, round_seed, train_in_rounds
        from harness.train.oracles import judged_win_matrices, winner_pairs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        sampler = Sampler(job.plan, self.temperature, engine=job.engine)
        judge_tokens = [0]

        def label(path, prompts: list, round_number: int) -> tuple[list[dict], dict]:
            samples = sampler.samples(path, prompts, self.samples, seed=round_seed(job.seed, round_number, self.samples))
            judge = LocalHFJudge(str(path), max_output_chars=self.max_output_chars, device=device,
                                 batch_size=job.plan.sequence_batch, config_key=f"method_params.{self.name}")
            matrices, judgments = judged_win_matrices(judge, prompts, samples)
            del judge
            judge_tokens[0] += judged_prompt_tokens(judgments)
            pairs, winners, losers = winner_pairs(prompts, samples, matrices)
            gaps = [w - l for w, l in zip(winners, losers)]
            consistent = [float(j.consistent(0.0)) for j in judgments]
            return pairs, {"judge_score_gap": sum(gaps) / len(gaps) if gaps else None,
                           "judge_position_consistency": sum(consistent) / len(consistent) if consistent else None,
                           "judgments": len(judgments)}

        rounds = train_in_rounds(job, name=self.name, rounds=self.rounds, label=label,
                                 round_method=PairwiseRound(beta=self.beta, learning_rate=self.learning_rate))
        reference_tokens = rounds.totals["reference_tokens"] + sampler.tokens + judge_tokens[0]
        extra = {**rounds.summary(), "generation_tokens": sampler.tokens, "judge_tokens": judge_tokens[0],
                 "judgments": sum(h["judgments"] for h in rounds.trained),
                 "judge_score_gaps": [h["judge_score_gap"] for h in rounds.trained],
                 "judge_position_consistency": [h["judge_position_consistency"] for h in rounds.trained],
                 "judge": {"type": "local_hf", "model": "the policy of each round", "prompt": JUDGE_PROMPT,
                           "answer_prefix": LOCAL_ANSWER_PREFIX, "max_output_chars": self.max_output_chars},
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py); the judge is the policy"}
        return rounds.outcome(reference_tokens=reference_tokens, extra=extra)
