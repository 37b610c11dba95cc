"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback", arXiv:2402.04792),
via TRL's experimental OnlineDPOTrainer.

Each step samples two completions per prompt from the *current* policy, lets the reward pick the
chosen one (higher reward = chosen; the annotator of the paper's §3), and takes a DPO step on that
fresh pair (Rafailov et al. 2023, eq. 7) against the frozen starting checkpoint:

    L = −log σ( β·log πθ(y_w|x)/π_ref(y_w|x) − β·log πθ(y_l|x)/π_ref(y_l|x) ).

TRL 1.16's ``OnlineDPOTrainer`` takes ``reward_funcs`` — callables or sequence-classification models;
the harness passes ``job.reward`` wrapped as a callable (``harness.train.rewards.trl_reward_function``), so
every reward kind works and a reward model is loaded once.

**Budget**: ``budget.batch_pairs`` prompts per optimizer step (each → one sampled pair),
``budget.epochs`` passes over the budget's prompts, completions up to ``budget.max_completion_tokens``.
**Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): with G = prompt + completion
tokens of both samples, ``policy_tokens`` = G (both sequences go through forward+backward),
``reference_tokens`` = G (generation) + G (reference) + reward-model tokens × N_reward/N. ``visit_cost``
gives the same sums for one prompt visit (two samples of prompt + ``budget.max_completion_tokens`` tokens)
for ``budget.match=tokens|flops`` (``harness.train.matching``).
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


class OnlineDPO:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = True

    def __init__(self, name: str = "online_dpo", learning_rate: float = 5e-7, beta: float = 0.1,
                 loss_type: str = "sigmoid", temperature: float = 0.9, missing_eos_penalty: float | None = None):
        self.name = name
        self.learning_rate = learning_rate
        self.beta = beta
        self.loss_type = loss_type
        self.temperature = temperature
        self.missing_eos_penalty = missing_eos_penalty


    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """(trained, forward-only) tokens of one prompt visit, in policy-parameter equivalents (module docstring)."""
        generated = 2 * (prompt_tokens + completion_tokens)
        return float(generated), generated * (2.0 + sizes.reward_share)  # generation, reference, reward model

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        from harness.train.rewards import reward_record, trl_reward_function
        from harness.evaluate.engines import trl_sampling_arguments
        from harness.train.trl_support import finish, peft_config, summed_over_processes, trl_arguments

        if job.reward is None:
            raise HarnessError("online_dpo needs a reward: set reward=<name> (conf/reward/)")
        budget = job.budget
        tokenizer = load_tokenizer(job.start_checkpoint)
        reward_function = trl_reward_function(job.reward, tokenizer)
        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        config = OnlineDPOConfig(**arguments, beta=self.beta, loss_type=self.loss_type, temperature=self.temperature,
                                 max_new_tokens=budget.max_completion_tokens,
                                 missing_eos_penalty=self.missing_eos_penalty,
                                 model_init_kwargs={"dtype": "float32", "device_map": None},
                                 **trl_sampling_arguments(job.engine))
        prompts = Dataset.from_list([{"prompt": row["prompt"]} for row in job.plan.rows])
        trainer = OnlineDPOTrainer(model=str(job.start_checkpoint), reward_funcs=reward_function, args=config,
                                   train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config(job))
        before = job.reward.tokens_scored
        trainer.train()
        # each process generated and scored its own prompts (harness.run.launch): the run counts their sums
        usage = summed_over_processes(trainer.accelerator, {**reward_function.usage,
                                                            "reward_tokens": job.reward.tokens_scored - before})
        generated = usage["prompt_tokens"] + usage["completion_tokens"]
        reward_tokens = usage["reward_tokens"]
        parameters = sum(p.numel() for p in trainer.model.parameters())
        counts = {"generation_tokens": generated, "reference_forward_tokens": generated, "reward_tokens": reward_tokens,
                  "policy_trained_tokens": generated}
        reference_tokens = 2 * generated + reward_tokens * job.reward.parameters / parameters
        extra = {**counts, "completions": usage["completions"], "completion_tokens": usage["completion_tokens"],
                 "prompt_tokens": usage["prompt_tokens"], "reward_parameters": job.reward.parameters,
                 "policy_parameters": parameters, "flops_accounting": "policy-parameter equivalents (methods/ppo.py)",
                 "reward": reward_record(job.reward)}
        aliases = {"reward": "objective/scores", "kl": "objective/kl", "entropy": "objective/entropy",
                   "reward_margin": "objective/scores_margin"}
        curves = [{**entry, **{alias: entry[key] for alias, key in aliases.items() if key in entry}}
                  for entry in trainer.state.log_history if "loss" in entry]
        outcome = finish(trainer, job, examples=usage["completions"], pairs=usage["completions"] / 2,
                         policy_tokens=generated, reference_tokens=round(reference_tokens), extra=extra)
        outcome.curves = curves
        return outcome
