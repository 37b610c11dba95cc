"""RLOO — REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740), via TRL's RLOOTrainer.

For each prompt k completions are sampled; completion i's advantage is its KL-penalized reward minus
the mean of the other k − 1 (eq. 6 with the leave-one-out baseline of Kool et al. 2019):

    A_i = R_i − 1/(k−1)·Σ_{j≠i} R_j,    R_i = r(x, y_i) − β·Σ_t (log πθ(y_i,t|·) − log π_ref(y_i,t|·)),

and the policy follows the clipped importance-weighted REINFORCE gradient (TRL's ``epsilon``).

**Budget** (shared with ``methods/grpo.py`` by ``train_sampling_method``): the prompts of the budget's
pairs, ``budget.batch_pairs`` prompts × ``num_generations`` completions per optimizer step,
``budget.epochs`` passes, each generation batch trained ``num_iterations`` times (the plan's optimizer steps,
``harness.train.plan``), completions up to ``budget.max_completion_tokens``. The reward is ``job.reward``
wrapped as a TRL reward function (``harness.train.rewards.trl_reward_function``), so a reward model is loaded
once, by the harness.

**Tokens / FLOPs** (policy-parameter equivalents, as ``methods/ppo.py``): with G = prompt + completion
tokens of every sampled completion (TRL's ``num_input_tokens_seen``),
``policy_tokens`` = G × num_iterations; ``reference_tokens`` = G (generation) + G (old log-probs, when
the trainer computes them) + G (reference, when β > 0) + reward-model tokens × N_reward/N.
``extra`` keeps ``generation_tokens``, ``reward_tokens`` and the rest. ``sampling_visit_cost`` gives the same
sums for one prompt visit (k completions of prompt + ``budget.max_completion_tokens`` tokens) for
``budget.match=tokens|flops`` (``harness.train.matching``); visits come in whole generation batches of
``budget.batch_pairs`` prompts, since TRL's sampler only yields full batches.
"""

from __future__ import annotations

from harness.checks import Range
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.sampling import sampling_visit_cost, train_sampling_method


class RLOO:
    data_view = "pairs"        # only the prompts are used
    parameter_ranges = {"beta": Range(0)}  # beta is the KL coefficient here: 0 = no KL penalty
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "rloo", learning_rate: float = 1e-6, beta: float = 0.05,
                 num_generations: int = 2, temperature: float = 1.0, epsilon: float = 0.2,
                 num_iterations: int = 1, normalize_advantages: bool = False):
        self.name = name
        self.learning_rate = learning_rate
        self.beta = beta
        self.num_generations = num_generations
        self.temperature = temperature
        self.epsilon = epsilon
        self.num_iterations = num_iterations
        self.normalize_advantages = normalize_advantages


    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        return sampling_visit_cost(prompt_tokens + completion_tokens, sizes, num_generations=self.num_generations,
                                   num_iterations=self.num_iterations, old_logprob_pass=True, beta=self.beta)

    def visit_granularity(self, budget) -> tuple[int, int]:
        return budget.batch_pairs, budget.batch_pairs  # whole generation batches

    # the training plan (harness.train.plan): a batch holds k completions a prompt, and is trained μ times
    @property
    def examples_per_pair(self) -> int:
        return self.num_generations

    def updates_per_batch(self, prompts: int) -> int:
        return self.num_iterations

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from trl import RLOOConfig, RLOOTrainer

        options = dict(beta=self.beta, epsilon=self.epsilon, normalize_advantages=self.normalize_advantages)
        return train_sampling_method(job, RLOOConfig, RLOOTrainer, learning_rate=self.learning_rate,
                                     num_generations=self.num_generations, temperature=self.temperature,
                                     num_iterations=self.num_iterations, old_logprob_pass=True, options=options)


