"""ORPO — Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691), via TRL's
experimental ORPOTrainer.

Loss (eq. 6):  L = E[ L_SFT + λ·L_OR ],  L_OR = −log σ( log odds_θ(y_w|x) / odds_θ(y_l|x) ),
odds_θ(y|x) = P_θ(y|x) / (1 − P_θ(y|x)) with P_θ the per-token average likelihood (eq. 4).
SFT and preference alignment in one stage, no reference model. TRL's ``beta`` is the paper's λ.

TRL detail: its NLL term runs over prompt and completion tokens of the chosen sequence (the paper's
L_SFT is over the response). ``trl.experimental`` is imported inside the methods so a TRL release
that moves it touches this file only.
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class ORPO:
    data_view = "pairs"
    reference_based = False

    def __init__(self, name: str = "orpo", beta: float = 0.1, learning_rate: float = 5e-6):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate


    def trl_config(self, job: TrainingJob):
        """The budget and this method's hyperparameters as a TRL ``ORPOConfig`` (no training)."""
        from trl.experimental.orpo import ORPOConfig

        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        return ORPOConfig(**arguments, beta=self.beta)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl.experimental.orpo import ORPOTrainer

        config = self.trl_config(job)
        train = Dataset.from_list(to_conversational(job.plan.rows))
        trainer = ORPOTrainer(
            model=str(job.start_checkpoint),
            args=config,
            train_dataset=train,
            processing_class=load_tokenizer(job.start_checkpoint),
            peft_config=peft_config(job),
        )
        trainer.train()
        passes = epochs_fraction(trainer, job)
        # chosen_input_ids / rejected_input_ids hold whole sequences (prompt included, truncated to
        # max_length); nothing is scored by a frozen model
        tokens = sum(len(ids) for column in ("chosen_input_ids", "rejected_input_ids")
                     for ids in trainer.train_dataset[column])
        return finish(trainer, job, examples=round(passes * len(train)), pairs=passes * len(train),
                      policy_tokens=round(passes * tokens), reference_tokens=0)
