"""TRL's group-sampling trainers (RLOO, GRPO) on a job's prompts with the sweep's reward, and their cost.

Tokens and FLOPs are counted in policy-parameter equivalents (see ``methods/ppo.py``): every generated
sequence, its old-log-prob pass, the reference's pass (β ≠ 0) and the reward model's (× N_reward/N).
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


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
    from harness.inputs.tokenizer_cache import load_tokenizer

    from harness.train.rewards import reward_record, trl_reward_function
    from harness.evaluate.engines import trl_sampling_arguments
    from harness.train.trl_support import finish, peft_config, summed_over_processes, trl_arguments

    if job.reward is None:
        raise HarnessError("this method needs a reward: set reward=<name> (conf/reward/)")
    if num_generations < 2:
        raise HarnessError(f"num_generations={num_generations}: group-relative methods need at least 2 per prompt")
    budget = job.budget
    tokenizer = load_tokenizer(job.start_checkpoint)
    reward_function = trl_reward_function(job.reward, tokenizer)
    arguments = trl_arguments(job, learning_rate=learning_rate)  # the plan: k completions a prompt, μ steps a batch
    arguments.pop("max_length")  # prompts are already cut to the budget; completions by max_completion_length
    config = config_class(**arguments, num_generations=num_generations, temperature=temperature,
                          max_completion_length=budget.max_completion_tokens, num_iterations=num_iterations,
                          **trl_sampling_arguments(job.engine), **options)
    prompts = Dataset.from_list([{"prompt": row["prompt"]} for row in job.plan.rows])
    trainer = trainer_class(model=str(job.start_checkpoint), reward_funcs=reward_function, args=config,
                            train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config(job))
    before = job.reward.tokens_scored
    trainer.train()
    # each process generated and scored its own prompts: the run's counts are their sums (TRL's token count is global)
    usage = summed_over_processes(trainer.accelerator, {**reward_function.usage,
                                                        "reward_tokens": job.reward.tokens_scored - before})
    generated = trainer.state.num_input_tokens_seen or (usage["prompt_tokens"] + usage["completion_tokens"])
    reward_tokens = usage["reward_tokens"]
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
