"""CPO and SimPO — reference-free preference optimization, via TRL's experimental CPOTrainer.

CPO — Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417), Section 3:
  L = L_prefer + α·L_NLL,  L_prefer = −E[ log σ( β·log πθ(y_w|x) − β·log πθ(y_l|x) ) ],
  L_NLL = −E[ log πθ(y_w|x) ]   (the paper weighs the two equally, α = 1).
  No reference model: the DPO loss with π_ref taken as uniform, plus a behaviour-cloning term.

SimPO — Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734), eq. 6:
  L = −E[ log σ( β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ ) ]
  length-normalized log-likelihood as the reward and a target margin γ. In TRL it is the CPO
  trainer with ``loss_type="simpo"`` and no NLL term (``cpo_alpha=0``); TRL's ``simpo_gamma`` is γ
  itself. The SimPO authors tune the ratio γ/β instead of γ (official README: "easier to tune
  under different β"), so this adapter takes ``gamma_beta_ratio`` and passes γ = β·ratio.

The trainer is TRL's with one override: only the positions scored get logits (``cpo_trainer_class``, same loss).
TRL differences worth knowing: the NLL term is the mean over chosen-completion tokens (the paper's
is per sequence); log-probabilities are summed for ``sigmoid`` and averaged for ``simpo``/``ipo``.
``trl.experimental`` is imported inside the methods so a TRL release that moves it touches this file.
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class CPO:
    data_view = "pairs"
    reference_based = False

    def __init__(self, name: str = "cpo", beta: float = 0.1, learning_rate: float = 5e-7,
                 loss_type: str = "sigmoid", cpo_alpha: float = 1.0, gamma_beta_ratio: float = 0.0,
                 label_smoothing: float = 0.0):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.loss_type = loss_type
        self.cpo_alpha = cpo_alpha
        self.gamma_beta_ratio = gamma_beta_ratio
        self.label_smoothing = label_smoothing


    def trl_config(self, job: TrainingJob):
        """The budget and this method's hyperparameters as a TRL ``CPOConfig`` (no training)."""
        from trl.experimental.cpo import CPOConfig

        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        return CPOConfig(**arguments, beta=self.beta, loss_type=self.loss_type, cpo_alpha=self.cpo_alpha,
                         simpo_gamma=self.beta * self.gamma_beta_ratio, label_smoothing=self.label_smoothing)

    def trainer(self, job: TrainingJob):
        """TRL's CPOTrainer (with the compact LM head, ``cpo_trainer_class``) over the plan's pairs, ready to train."""
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from harness.train.trl_extensions import cpo_trainer_class

        return cpo_trainer_class()(
            model=str(job.start_checkpoint),
            args=self.trl_config(job),
            train_dataset=Dataset.from_list(to_conversational(job.plan.rows)),
            processing_class=load_tokenizer(job.start_checkpoint),
            peft_config=peft_config(job),
        )

    def train(self, job: TrainingJob) -> TrainingOutcome:
        trainer = self.trainer(job)
        train = job.plan.rows
        trainer.train()
        passes = epochs_fraction(trainer, job)
        # chosen_input_ids / rejected_input_ids hold whole sequences (prompt included, truncated to
        # max_length); nothing is scored by a frozen model
        tokens = sum(len(ids) for column in ("chosen_input_ids", "rejected_input_ids")
                     for ids in trainer.train_dataset[column])
        return finish(trainer, job, examples=round(passes * len(train)), pairs=passes * len(train),
                      policy_tokens=round(passes * tokens), reference_tokens=0)
