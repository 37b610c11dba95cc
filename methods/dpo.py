"""DPO — Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), via TRL's DPOTrainer.

Loss (eq. 7):  L = -E[ log σ( β·log πθ(y_w|x)/π_ref(y_w|x) - β·log πθ(y_l|x)/π_ref(y_l|x) ) ]

TRL's ``loss_type`` selects other members of the family with the same trainer (``ipo``,
``hinge``, ``robust``, ...); the ``conf/method`` file of each alias sets it.

The reference log-probs are precomputed once per run (``precompute_ref_log_probs=True``) through
the harness's shared on-disk cache (``harness.trl_extensions``): a later run with the same
starting checkpoint, pairs and lengths — any reference-based pair method — reads them instead of
scoring again, and then reports ``reference_tokens = 0`` and ``reference_cache: hit``.

The plain functions below (``pairwise_trainer``, ``pairwise_usage``, ``train_pairwise``) are the
machinery every pair method with its own loss reuses (``methods/rdpo.py``, ``dpop``,
``beta_dpo``, ``npo``, ``sdpo``).
"""

from __future__ import annotations

from pathlib import Path

from harness.protocols import TrainingJob, TrainingOutcome
from harness.training import count_tokens, epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class DPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "dpo", beta: float = 0.1, learning_rate: float = 5e-7,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    def hyperparameters(self) -> dict:
        return {"beta": self.beta, "learning_rate": self.learning_rate, "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing}

    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              loss_type=[self.loss_type], label_smoothing=self.label_smoothing)


def pairwise_trainer(job: TrainingJob, rows: list[dict], *, start: Path, beta: float, learning_rate: float,
                     pairwise_loss=None, **dpo_options):
    """A DPO trainer on pair ``rows`` starting from (and referenced to) the checkpoint ``start``.

    ``pairwise_loss`` (see ``harness.trl_extensions``) replaces TRL's loss; ``dpo_options`` go to
    ``DPOConfig`` (``loss_type``, ``label_smoothing``, ...). Reference log-probs are precomputed
    through ``job.reference_cache_dir``.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from harness.trl_extensions import HarnessDPOTrainer

    arguments = trl_arguments(job, examples_per_pair=1, learning_rate=learning_rate)
    config = DPOConfig(**arguments, beta=beta, precompute_ref_log_probs=True, **dpo_options)
    return HarnessDPOTrainer(
        model=str(start),
        args=config,
        train_dataset=Dataset.from_list(to_conversational(rows)),
        processing_class=AutoTokenizer.from_pretrained(start),
        peft_config=peft_config(job),
        pairwise_loss=pairwise_loss,
        reference_cache_dir=job.reference_cache_dir,
        reference_path=start,
    )


def pairwise_usage(trainer, job: TrainingJob, rows: int) -> dict:
    """What a trained pair trainer consumed, as ``finish`` keyword arguments.

    Policy tokens count every pass the trainer made; reference tokens are what the method needs
    scored by the reference, once per row (precomputed). They count whether this run scored them or
    read them from the shared cache, so a method's consumed FLOPs do not depend on the order of the
    sweep; ``reference_tokens_scored_here`` (0 on a cache hit) says what this run paid.
    """
    passes = epochs_fraction(trainer, rows, job.budget.batch_pairs)
    tokens = count_tokens(trainer.train_dataset, ["chosen_ids", "rejected_ids"], trainer.args.max_length)
    status = trainer.reference_cache_status.get("train", "off")
    return dict(examples=round(passes * rows), pairs=passes * rows, policy_tokens=round(passes * tokens),
                reference_tokens=tokens,
                extra={"reference_cache": status, "reference_tokens_scored_here": 0 if status == "hit" else tokens,
                       "reference_seconds": round(trainer.reference_seconds, 3)})


def train_pairwise(job: TrainingJob, *, beta: float, learning_rate: float, pairwise_loss=None,
                   **dpo_options) -> TrainingOutcome:
    """Train on ``job``'s pairs from its starting checkpoint and save the policy (see ``pairwise_trainer``)."""
    rows = job.data["train"]
    trainer = pairwise_trainer(job, rows, start=job.start_checkpoint, beta=beta, learning_rate=learning_rate,
                               pairwise_loss=pairwise_loss, **dpo_options)
    trainer.train()
    return finish(trainer, job, **pairwise_usage(trainer, job, len(rows)))
