"""GRPO — group relative policy optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300), via TRL's GRPOTrainer.

For each prompt a group of G completions is sampled; each completion's advantage is its reward
standardized within the group (eq. 3 / §4.1.2, outcome supervision):

    Â_i = (r_i − mean(r_1..r_G)) / std(r_1..r_G),

and the clipped surrogate is maximized with a KL penalty to the reference added to the *loss* per
token using the k3 estimator (eq. 4; Schulman 2020): β·(π_ref/πθ − log(π_ref/πθ) − 1).
``loss_type`` picks TRL's token aggregation (``grpo`` = the paper's per-sequence mean; ``dapo``,
``dr_grpo`` = later variants; TRL 1.16's default is ``dapo``).

Budget, reward wrapping and token / FLOPs accounting: ``methods/rloo.py`` (``train_sampling_method``);
GRPO re-scores completions without gradients (old log-probs) only when ``num_iterations`` > 1; its
``visit_cost`` for ``budget.match=tokens|flops`` is ``sampling_visit_cost`` there.
"""

from __future__ import annotations

from harness.checks import Range
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.sampling import sampling_visit_cost, train_sampling_method


class GRPO:
    data_view = "pairs"        # only the prompts are used
    parameter_ranges = {"beta": Range(0)}  # beta is the KL coefficient here: 0 = no KL term (TRL's default)
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "grpo", learning_rate: float = 1e-6, beta: float = 0.04,
                 num_generations: int = 8, temperature: float = 1.0, epsilon: float = 0.2,
                 num_iterations: int = 1, loss_type: str = "grpo", scale_rewards: str = "group"):
        self.name = name
        self.learning_rate = learning_rate
        self.beta = beta
        self.num_generations = num_generations
        self.temperature = temperature
        self.epsilon = epsilon
        self.num_iterations = num_iterations
        self.loss_type = loss_type
        self.scale_rewards = scale_rewards


    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        return sampling_visit_cost(prompt_tokens + completion_tokens, sizes, num_generations=self.num_generations,
                                   num_iterations=self.num_iterations, old_logprob_pass=self.num_iterations > 1,
                                   beta=self.beta)

    def visit_granularity(self, budget) -> tuple[int, int]:
        return budget.batch_pairs, budget.batch_pairs  # whole generation batches

    # the training plan (harness.train.plan): a batch holds k completions a prompt, and is trained μ times
    @property
    def examples_per_pair(self) -> int:
        return self.num_generations

    def updates_per_batch(self, prompts: int) -> int:
        return self.num_iterations

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from trl import GRPOConfig, GRPOTrainer

        options = dict(beta=self.beta, epsilon=self.epsilon, loss_type=self.loss_type, scale_rewards=self.scale_rewards)
        return train_sampling_method(job, GRPOConfig, GRPOTrainer, learning_rate=self.learning_rate,
                                     num_generations=self.num_generations, temperature=self.temperature,
                                     num_iterations=self.num_iterations, old_logprob_pass=self.num_iterations > 1,
                                     options=options)
