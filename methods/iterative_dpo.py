"""Iterative DPO — rounds of on-policy sampling, reward labelling and DPO (Xu et al. 2023, "Some things are more
CRINGE than others", arXiv:2312.16682; Xiong et al. 2024, "Iterative preference learning from human feedback",
arXiv:2312.11456; Yuan et al. 2024, self-rewarding LMs, with an external reward).

Each round r = 1..``rounds``:

1. **generate** two samples per prompt from the current policy π_{r−1} (``harness.evaluate.generation.generate``,
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
cost model there, ``harness.train.matching``).
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

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import PairwiseRound
from harness.train.rounds import (Sampler, best_and_worst, check_rounds, heldout_evaluation_cost, heldout_reward,
                                   rounds_granularity, round_seed, score_samples, train_in_rounds)


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


    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
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
        from harness.train.rewards import reward_record

        reward = job.reward
        if reward is None:
            raise HarnessError(f"{self.name} needs a reward: set reward=<name> (conf/reward/)")
        sampler = Sampler(job.plan, self.temperature, engine=job.engine)
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
                                 round_method=PairwiseRound(beta=self.beta, learning_rate=self.learning_rate),
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


