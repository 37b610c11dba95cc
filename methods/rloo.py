"""RLOO — REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740), via TRL's RLOOTrainer.

For each prompt k completions are sampled; completion i's advantage is its KL-penalized reward minus
the mean of the other k − 1 (eq. 6 with the leave-one-out baseline of Kool et al. 2019):

    A_i = R_i − 1/(k−1)·Σ_{j≠i} R_j,    R_i = r(x, y_i) − β·Σ_t (log πθ(y_i,t|·) − log π_ref(y_i,t|·)),

and the policy follows the clipped importance-weighted REINFORCE gradient (TRL's ``epsilon``).

**Budget** (shared with ``methods/grpo.py`` by ``train_sampling_method``): the prompts of the budget's
pairs, ``budget.batch_pairs`` prompts × ``num_generations`` completions per optimizer step,
``budget.epochs`` passes (``max_steps`` = budget.planned_steps() × ``num_iterations``), completions up
to ``budget.max_completion_tokens``. The reward is ``job.reward`` wrapped as a TRL reward function
(``harness.rewards.trl_reward_function``), so a reward model is loaded once, by the harness.

**Tokens / FLOPs** (policy-parameter equivalents, as ``methods/ppo.py``): with G = prompt + completion
tokens of every sampled completion (TRL's ``num_input_tokens_seen``),
``policy_tokens`` = G × num_iterations; ``reference_tokens`` = G (generation) + G (old log-probs, when
the trainer computes them) + G (reference, when β > 0) + reward-model tokens × N_reward/N.
``extra`` keeps ``generation_tokens``, ``reward_tokens`` and the rest. ``sampling_visit_cost`` gives the same
sums for one prompt visit (k completions of prompt + ``budget.max_completion_tokens`` tokens) for
``budget.match=tokens|flops`` (``harness.matching``); visits come in whole generation batches of
``budget.batch_pairs`` prompts, since TRL's sampler only yields full batches.
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


class RLOO:
    data_view = "pairs"        # only the prompts are used
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

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in ("learning_rate", "beta", "num_generations", "temperature", "epsilon",
                                              "num_iterations", "normalize_advantages")}

    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        return sampling_visit_cost(prompt_tokens + completion_tokens, sizes, num_generations=self.num_generations,
                                   num_iterations=self.num_iterations, old_logprob_pass=True, beta=self.beta)

    def visit_granularity(self, budget) -> tuple[int, int]:
        return budget.batch_pairs, budget.batch_pairs  # whole generation batches

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from trl import RLOOConfig, RLOOTrainer

        options = dict(beta=self.beta, epsilon=self.epsilon, normalize_advantages=self.normalize_advantages)
        return train_sampling_method(job, RLOOConfig, RLOOTrainer, learning_rate=self.learning_rate,
                                     num_generations=self.num_generations, temperature=self.temperature,
                                     num_iterations=self.num_iterations, old_logprob_pass=True, options=options)


def sampling_visit_cost(sequence_tokens: int, sizes, *, num_generations: int, num_iterations: int,
                        old_logprob_pass: bool, beta: float) -> tuple[float, float]:
    """(trained, forward-only) tokens of one prompt visit in policy-parameter equivalents, as
    ``train_sampling_method`` counts them: k = ``num_generations`` sequences of ``sequence_tokens`` each,
    trained ``num_iterations`` times; generated, re-scored (old log-probs), scored by the reference (β ≠ 0) and
    by the reward model (× N_reward/N) once."""
    generated = num_generations * sequence_tokens
    passes = 1.0 + (1.0 if old_logprob_pass else 0.0) + (1.0 if beta else 0.0) + sizes.reward_share
    return float(generated * num_iterations), generated * passes


# TRL log keys → the harness's curve names (the raw keys stay too)
CURVE_ALIASES = {"clip_fraction": "clip_ratio/region_mean", "completion_tokens": "completions/mean_length"}


def train_sampling_method(job: TrainingJob, config_class, trainer_class, *, learning_rate: float,
                          num_generations: int, temperature: float, num_iterations: int, old_logprob_pass: bool,
                          options: dict) -> TrainingOutcome:
    """Train a TRL group-sampling trainer (RLOO, GRPO) on ``job``'s prompts with ``job.reward``; see module docstring.

    ``old_logprob_pass``: whether the trainer scores the sampled completions once more without gradients
    before the update (RLOO always does; GRPO only when ``num_iterations`` > 1).
    """
    from datasets import Dataset
    from transformers import AutoTokenizer

    from harness.rewards import reward_record, trl_reward_function
    from harness.training import finish, peft_config, trl_arguments

    if job.reward is None:
        raise HarnessError("this method needs a reward: set reward=<name> (conf/reward/)")
    if num_generations < 2:
        raise HarnessError(f"num_generations={num_generations}: group-relative methods need at least 2 per prompt")
    budget = job.budget
    tokenizer = AutoTokenizer.from_pretrained(job.start_checkpoint)
    reward_function = trl_reward_function(job.reward, tokenizer)
    arguments = trl_arguments(job, examples_per_pair=num_generations, learning_rate=learning_rate)
    arguments.pop("max_length")  # prompts are already cut to the budget; completions by max_completion_length
    arguments["max_steps"] = budget.planned_steps() * num_iterations
    config = config_class(**arguments, num_generations=num_generations, temperature=temperature,
                          max_completion_length=budget.max_completion_tokens, num_iterations=num_iterations,
                          **options)
    prompts = Dataset.from_list([{"prompt": row["prompt"]} for row in job.data["train"]])
    trainer = trainer_class(model=str(job.start_checkpoint), reward_funcs=reward_function, args=config,
                            train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config(job))
    before = job.reward.tokens_scored
    trainer.train()
    usage = reward_function.usage
    generated = trainer.state.num_input_tokens_seen or (usage["prompt_tokens"] + usage["completion_tokens"])
    reward_tokens = job.reward.tokens_scored - before
    parameters = sum(p.numel() for p in trainer.model.parameters())
    beta = options.get("beta", 0.0)
    counts = {"generation_tokens": generated, "old_logprob_tokens": generated if old_logprob_pass else 0,
              "reference_forward_tokens": generated if beta else 0, "reward_tokens": reward_tokens,
              "policy_trained_tokens": generated * num_iterations}
    reference_tokens = (counts["generation_tokens"] + counts["old_logprob_tokens"] + counts["reference_forward_tokens"]
                        + reward_tokens * job.reward.parameters / parameters)
    extra = {**counts, "completions": usage["completions"], "completion_tokens": usage["completion_tokens"],
             "prompt_tokens": usage["prompt_tokens"], "reward_parameters": job.reward.parameters,
             "policy_parameters": parameters, "flops_accounting": "policy-parameter equivalents (methods/ppo.py)",
             "reward": reward_record(job.reward)}
    prompts_seen = usage["completions"] / num_generations
    curves = [{**entry, **{alias: entry[key] for alias, key in CURVE_ALIASES.items() if key in entry}}
              for entry in trainer.state.log_history if "reward" in entry]
    outcome = finish(trainer, job, examples=usage["completions"], pairs=prompts_seen,
                     policy_tokens=counts["policy_trained_tokens"], reference_tokens=round(reference_tokens), extra=extra)
    outcome.curves = curves
    return outcome
