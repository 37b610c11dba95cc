"""The pair trainer every DPO-family adapter shares: TRL's ``DPOTrainer`` (through ``HarnessDPOTrainer``, which adds
an own ``pairwise_loss`` and the shared reference log-prob cache) on a job's pairs, and what it consumed.

Used by ``methods/dpo.py`` and its TRL aliases, the own losses (``rdpo``, ``dpop``, ``beta_dpo``, ``npo``,
``sdpo``, ``cdpo``) and, one round at a time, the round loop (``harness.train.rounds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import (count_tokens, epochs_fraction, finish, model_init_kwargs, peft_config,
                                       to_conversational, trl_arguments)


def pairwise_trainer(job: TrainingJob, *, start: Path, beta: float, learning_rate: float,
                     pairwise_loss=None, **dpo_options):
    """A DPO trainer on the pairs of ``job.plan`` starting from (and referenced to) the checkpoint ``start``.

    ``pairwise_loss`` (see ``harness.train.trl_extensions``) replaces TRL's loss; ``dpo_options`` go to
    ``DPOConfig`` (``loss_type``, ``label_smoothing``, ...). Reference log-probs are precomputed
    through ``job.reference_cache_dir``; the model loads as ``model_init_kwargs`` says (eager attention on the CPU
    for short sequences).
    """
    from datasets import Dataset
    from harness.inputs.tokenizer_cache import load_tokenizer
    from trl import DPOConfig

    from harness.train.trl_extensions import HarnessDPOTrainer

    arguments = trl_arguments(job, learning_rate=learning_rate)
    config = DPOConfig(**arguments, beta=beta, precompute_ref_log_probs=True, model_init_kwargs=model_init_kwargs(job),
                       **dpo_options)
    return HarnessDPOTrainer(
        model=str(start),
        args=config,
        train_dataset=Dataset.from_list(to_conversational(job.plan.rows)),
        processing_class=load_tokenizer(start),
        peft_config=peft_config(job),
        pairwise_loss=pairwise_loss,
        reference_cache_dir=job.reference_cache_dir,
        reference_path=start,
    )


def pairwise_usage(trainer, job: TrainingJob) -> dict:
    """What a trained pair trainer consumed, as ``finish`` keyword arguments.

    Policy tokens count every pass the trainer made; reference tokens are what the method needs
    scored by the reference, once per row (precomputed). They count whether this run scored them or
    read them from the shared cache, so a method's consumed FLOPs do not depend on the order of the
    sweep; ``reference_tokens_scored_here`` (0 on a cache hit) says what this run paid.
    """
    passes = epochs_fraction(trainer, job)
    rows = len(job.plan.rows)
    tokens = count_tokens(trainer.train_dataset, ["chosen_ids", "rejected_ids"], trainer.args.max_length)
    status = trainer.reference_cache_status.get("train", "off")
    return dict(examples=round(passes * rows), pairs=passes * rows, policy_tokens=round(passes * tokens),
                reference_tokens=tokens,
                extra={"reference_cache": status, "reference_tokens_scored_here": 0 if status == "hit" else tokens,
                       "reference_seconds": round(trainer.reference_seconds, 3)})


def train_pairwise(job: TrainingJob, *, beta: float, learning_rate: float, pairwise_loss=None,
                   **dpo_options) -> TrainingOutcome:
    """Train on ``job``'s pairs from its starting checkpoint and save the policy (see ``pairwise_trainer``)."""
    trainer = pairwise_trainer(job, start=job.start_checkpoint, beta=beta, learning_rate=learning_rate,
                               pairwise_loss=pairwise_loss, **dpo_options)
    trainer.train()
    return finish(trainer, job, **pairwise_usage(trainer, job))


@dataclass(frozen=True)
class PairwiseRound:
    """One DPO-family training pass as a plain object with ``train(job)``: what round loops
    (``harness.train.rounds.train_in_rounds``) and sampling methods (``rso``) train each batch of pairs with."""

    beta: float
    learning_rate: float
    loss_type: str = "sigmoid"          # TRL DPOConfig.loss_type
    label_smoothing: float = 0.0

    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate, loss_type=[self.loss_type],
                              label_smoothing=self.label_smoothing)
