"""Plain functions every TRL-backed method adapter shares: the budget → TRL arguments mapping,
chat-format conversion, token accounting and saving.

Keeping these here (and TRL imports inside each adapter) means a TRL release that moves a
trainer touches one adapter file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.train.budget import Budget
from harness.protocols import TrainingJob, TrainingOutcome

# Slack for the chat template's own tokens (role markers, system prompt) on top of the budget's
# prompt + completion lengths; TRL truncates the whole sequence to max_length.
TEMPLATE_TOKENS = 48


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def precision_flags(precision: str) -> dict:
    import torch

    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if cuda_bf16 else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def trl_arguments(job: TrainingJob, *, examples_per_pair: int, learning_rate: float) -> dict:
    """Keyword arguments shared by every TRL config class, from the sweep's budget.

    ``examples_per_pair`` is 1 for pair methods and 2 for unpaired ones, so both take the same
    number of optimizer steps over the same pairs.
    """
    budget: Budget = job.budget
    return dict(
        output_dir=str(job.scratch_dir),
        per_device_train_batch_size=budget.micro_batch_pairs * examples_per_pair,
        gradient_accumulation_steps=budget.gradient_accumulation(world_size()),
        num_train_epochs=budget.epochs,
        learning_rate=learning_rate,
        lr_scheduler_type=budget.lr_scheduler,
        warmup_steps=budget.warmup_ratio,  # transformers ≥5 reads a float < 1 as a ratio
        weight_decay=budget.weight_decay,
        max_grad_norm=budget.max_grad_norm,
        optim=budget.optimizer,
        seed=budget.seed,
        data_seed=budget.seed,
        max_length=budget.max_prompt_tokens + budget.max_completion_tokens + TEMPLATE_TOKENS,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **precision_flags(budget.precision),
    )


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
    """Save the trained policy (merged when LoRA) and its tokenizer into ``job.output_dir``."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(job.output_dir)
    trainer.processing_class.save_pretrained(job.output_dir)
    curves = [entry for entry in trainer.state.log_history if "loss" in entry or "train_loss" in entry]
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


def epochs_fraction(trainer, dataset_len: int, batch_examples: int) -> float:
    """How many passes over the data the trainer actually made (1.0 = each example once)."""
    steps = trainer.state.global_step
    return min(steps * batch_examples / max(dataset_len, 1), float(trainer.args.num_train_epochs))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))
