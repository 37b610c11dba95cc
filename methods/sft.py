"""SFT — supervised fine-tuning on the chosen responses, via TRL's SFTTrainer.

Loss: L = −E[ log πθ(y_w|x) ], completion tokens only. TRL's trainer with the compact LM head on the CPU
(``harness.train.trl_extensions.HarnessSFTTrainer``: only the labelled positions are projected, same loss). Also the harness's stage for *derived*
starting settings (e.g. ``sft`` = SFT on another setting's checkpoint).
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class SFT:
    data_view = "sft"
    reference_based = False

    def __init__(self, name: str = "sft", learning_rate: float = 2e-5):
        self.name = name
        self.learning_rate = learning_rate


    def trainer(self, job: TrainingJob):
        """TRL's SFTTrainer, scoring faster on the CPU (``HarnessSFTTrainer``), over the plan's rows, ready to train."""
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl import SFTConfig

        from harness.train.trl_extensions import HarnessSFTTrainer

        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        return HarnessSFTTrainer(
            model=str(job.start_checkpoint),
            args=SFTConfig(**arguments, completion_only_loss=True),
            train_dataset=Dataset.from_list(to_conversational(job.plan.rows)),
            processing_class=load_tokenizer(job.start_checkpoint),
            peft_config=peft_config(job),
        )

    def train(self, job: TrainingJob) -> TrainingOutcome:
        trainer = self.trainer(job)
        train, config = job.plan.rows, trainer.args
        trainer.train()
        passes = epochs_fraction(trainer, job)
        lengths = sum(min(len(ids), config.max_length) for ids in trainer.train_dataset["input_ids"])
        return finish(trainer, job, examples=round(passes * len(train)), pairs=passes * len(train),
                      policy_tokens=round(passes * lengths), reference_tokens=0)
