"""Plain functions every TRL-backed method adapter shares: the training plan → TRL arguments mapping
(``harness.train.plan``), chat-format conversion, token accounting and saving.

Keeping these here (and TRL imports inside each adapter) means a TRL release that moves a
trainer touches one adapter file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.protocols import TrainingJob, TrainingOutcome

# Longest sequence (tokens) a trainer on the CPU runs with transformers' plain matmul attention ("eager") instead of
# its default, SDPA. On short sequences eager is faster there (smoke DPO step: 6 % less time, bench/train_speed.py) and
# its bf16 numbers do not depend on how far a batch is padded, so an untrained policy's log-probs equal its precomputed
# reference's (SDPA's CPU kernel: bf16-rounding apart). It keeps the attention weights for the backward pass,
# ~6·batch·heads·length² bytes a layer, hence the cap; GPUs keep the default (memory-efficient kernels).
EAGER_ATTENTION_MAX_LENGTH = 256


def trl_arguments(job: TrainingJob, *, learning_rate: float) -> dict:
    """Keyword arguments shared by every TRL config class: the job's plan (``harness.train.plan``) as TRL reads it.

    The one budget → trainer mapping: micro-batch, accumulation, passes and the planned optimizer steps
    (``max_steps``, so every trainer takes exactly the plan's steps), warm-up, length cap and precision come from
    the plan; optimizer, schedule, decay, clipping, activation checkpointing and seed are the budget's as configured.
    """
    import torch

    plan = job.plan
    budget = plan.budget
    return dict(
        output_dir=str(job.scratch_dir),
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.gradient_accumulation,
        num_train_epochs=plan.epochs,
        max_steps=plan.optimizer_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=budget.lr_scheduler,
        warmup_steps=plan.warmup_steps,
        weight_decay=budget.weight_decay,
        max_grad_norm=budget.max_grad_norm,
        activation_checkpointing=budget.activation_checkpointing,
        optim=budget.optimizer,
        seed=budget.seed,
        data_seed=budget.seed,
        max_length=plan.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        bf16=plan.precision == "bf16",  # autocast: fp32 weights and optimizer, bf16 matmuls
        fp16=plan.precision == "fp16",
        # transformers refuses bf16 without a bf16 GPU unless told the run is on the CPU (autocast on the CPU)
        use_cpu=plan.precision == "bf16" and not torch.cuda.is_available(),
    )


def model_init_kwargs(job: TrainingJob) -> dict | None:
    """How a TRL trainer loads the job's model from its folder (``model_init_kwargs``): eager attention on the CPU for
    sequences up to ``EAGER_ATTENTION_MAX_LENGTH``, else transformers' defaults (None)."""
    import torch

    if torch.cuda.is_available() or job.plan.max_length > EAGER_ATTENTION_MAX_LENGTH:
        return None
    return {"attn_implementation": "eager"}


def peft_config(job: TrainingJob):
    if not job.budget.lora.enabled:
        return None
    from peft import LoraConfig

    lora = job.budget.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def to_conversational(rows: list[dict]) -> list[dict]:
    """Harness view rows → TRL's conversational format (completions as assistant messages)."""
    out = []
    for row in rows:
        new = dict(row)
        for field in ("chosen", "rejected", "completion"):
            if field in new:
                new[field] = assistant(new[field])
        out.append(new)
    return out


def count_tokens(dataset, columns: list[str], max_length: int | None = None, prompt_column: str = "prompt_ids") -> int:
    """Tokens in ``columns`` of a tokenized TRL dataset, each sequence = prompt + column, capped at max_length."""
    total = 0
    prompts = dataset[prompt_column]
    for column in columns:
        for prompt, completion in zip(prompts, dataset[column]):
            length = len(prompt) + len(completion)
            total += min(length, max_length) if max_length else length
    return total


def finish(trainer, job: TrainingJob, *, examples: int, pairs: float, policy_tokens: int,
           reference_tokens: int, extra: dict | None = None) -> TrainingOutcome:
    """Save the trained policy (merged when LoRA) and its tokenizer into ``job.output_dir``; in a run of many
    processes (``harness.run.launch``) rank 0 saves the gathered weights and every process waits for it."""
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:
        save_gathered(trainer, job.output_dir)
    else:
        model = trainer.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(job.output_dir)
        trainer.processing_class.save_pretrained(job.output_dir)
    curves = [entry for entry in trainer.state.log_history if "loss" in entry or "train_loss" in entry]
    if accelerator.is_main_process:
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
    return TrainingOutcome(
        optimizer_steps=trainer.state.global_step,
        examples=examples,
        pairs=pairs,
        policy_tokens=policy_tokens,
        reference_tokens=reference_tokens,
        curves=curves,
        extra=extra or {},
    )


def save_gathered(trainer, output_dir: Path) -> None:
    """Rank 0 saves the whole trained policy of a multi-process run: accelerate gathers the weights (a collective under
    FSDP / ZeRO-3, where each process holds a shard; the unwrapped module under DDP), LoRA adapters are merged (DDP
    only: ``harness.run.launch.check_launch`` refuses LoRA with sharded weights). Every process returns after the save."""
    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model.merge_and_unload().save_pretrained(output_dir)
        else:
            model.save_pretrained(output_dir, state_dict=state_dict)
        trainer.processing_class.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def summed_over_processes(accelerator, counts: dict) -> dict:
    """``counts`` summed over the processes of a multi-process run — what each counted of its own share of the work
    (its prompts' completions, its reward calls) — so the outcome counts the run once; as given with one process."""
    if accelerator.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    gathered = gather_object([counts])
    return {key: sum(part[key] for part in gathered) for key in counts}


def epochs_fraction(trainer, job: TrainingJob) -> float:
    """How many passes over the plan's rows the trainer actually made (1.0 = each row once)."""
    plan = job.plan
    rows_per_step = plan.micro_batch * plan.gradient_accumulation * plan.world_size
    return min(trainer.state.global_step * rows_per_step / max(len(plan.rows), 1), float(plan.epochs))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))
