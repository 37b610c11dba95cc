"""DPO — Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), via TRL's DPOTrainer.

Loss (eq. 7):  L = -E[ log σ( β·log πθ(y_w|x)/π_ref(y_w|x) - β·log πθ(y_l|x)/π_ref(y_l|x) ) ]

TRL's ``loss_type`` selects other members of the family with the same trainer (``ipo``,
``hinge``, ``robust``, ...); the ``conf/method`` file of each alias sets it.
"""

from __future__ import annotations

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
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        arguments = trl_arguments(job, examples_per_pair=1, learning_rate=self.learning_rate)
        config = DPOConfig(**arguments, beta=self.beta, loss_type=[self.loss_type], label_smoothing=self.label_smoothing)
        train = Dataset.from_list(to_conversational(job.data["train"]))
        trainer = DPOTrainer(
            model=str(job.start_checkpoint),  # TRL builds the frozen reference from the same path
            args=config,
            train_dataset=train,
            processing_class=AutoTokenizer.from_pretrained(job.start_checkpoint),
            peft_config=peft_config(job),
        )
        trainer.train()
        passes = epochs_fraction(trainer, len(train), job.budget.batch_pairs)
        tokens = round(passes * count_tokens(trainer.train_dataset, ["chosen_ids", "rejected_ids"], config.max_length))
        return finish(trainer, job, examples=round(passes * len(train)), pairs=passes * len(train),
                      policy_tokens=tokens, reference_tokens=tokens)
