"""KTO — Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306), via TRL's KTOTrainer.

Trains on unpaired desirable / undesirable examples. From preference pairs each pair yields one
desirable (chosen) and one undesirable (rejected) example, so a KTO batch holds twice as many
examples as a DPO batch over the same pairs and both take the same optimizer steps.

Loss (eq. 8): L = E[ λ_y − v(x, y) ] with
  v = λ_D·σ(β(r(x,y) − z0)) for desirable y,  λ_U·σ(β(z0 − r(x,y))) for undesirable y,
  r = log πθ(y|x)/π_ref(y|x), z0 = a batch estimate of KL(πθ‖π_ref) from mismatched pairs.
The paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]. By default (``desirable_weight`` and
``undesirable_weight`` null) the weights are set from the training rows' own counts n_D, n_U
(``kto_class_weights``: λ_U = 1, λ_D = ``weight_ratio``·n_U/n_D): balanced data from pairs gives
λ_D = λ_U = 1, natively unpaired binary feedback (``harness.inputs.data``, ``format: binary``) whatever
corrects its imbalance. The record's ``consumed`` says which counts and weights were used.
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import count_tokens, epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class KTO:
    data_view = "unpaired"
    reference_based = True
    # forward-only tokens per trained token: the reference scores completions and the mismatched KL
    # completions, and the policy scores the KL completions without gradient (harness.train.matching)
    forward_only_ratio = 3.0

    def __init__(self, name: str = "kto", beta: float = 0.1, learning_rate: float = 5e-7,
                 desirable_weight: float | None = None, undesirable_weight: float | None = None,
                 weight_ratio: float = 1.0):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.weight_ratio = weight_ratio


    def class_weights(self, rows: list[dict]) -> dict:
        """(λ_D, λ_U) for ``rows`` and the counts behind them: a weight left null is set from the counts so that
        λ_D·n_D / (λ_U·n_U) = ``weight_ratio`` (``kto_class_weights``); a weight given is used as is."""
        desirable = sum(1 for row in rows if row["label"])
        undesirable = len(rows) - desirable
        weights = {"desirable_examples": desirable, "undesirable_examples": undesirable}
        undesirable_weight = 1.0 if self.undesirable_weight is None else float(self.undesirable_weight)
        if self.desirable_weight is not None:
            desirable_weight = float(self.desirable_weight)
        else:
            try:
                desirable_weight = undesirable_weight * kto_class_weights(desirable, undesirable, self.weight_ratio)[0]
            except ValueError as error:
                raise HarnessError(f"{self.name}: {error}; set +method_params.{self.name}.desirable_weight and "
                                   f"undesirable_weight by hand, or use data with both labels") from None
        weights.update(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        if desirable and undesirable:
            weights["weighted_ratio"] = round(desirable_weight * desirable / (undesirable_weight * undesirable), 4)
        return weights

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import KTOConfig, KTOTrainer

        weights = self.class_weights(job.plan.rows)
        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        config = KTOConfig(**arguments, beta=self.beta, desirable_weight=weights["desirable_weight"],
                           undesirable_weight=weights["undesirable_weight"])
        train = Dataset.from_list(to_conversational(job.plan.rows))
        trainer = KTOTrainer(
            model=str(job.start_checkpoint),
            args=config,
            train_dataset=train,
            processing_class=AutoTokenizer.from_pretrained(job.start_checkpoint),
            peft_config=peft_config(job),
        )
        trainer.train()
        passes = epochs_fraction(trainer, job)
        trained = count_tokens(trainer.train_dataset, ["completion_ids"], config.max_length)
        kl_columns = ["KL_completion_ids"] if "KL_completion_ids" in trainer.train_dataset.column_names else []
        kl = count_tokens(trainer.train_dataset, kl_columns, config.max_length) if kl_columns else 0
        # The policy's KL-estimate pass runs without gradients: forward-only, like the reference's two passes.
        return finish(trainer, job, examples=round(passes * len(train)), pairs=passes * len(train) / 2,
                      policy_tokens=round(passes * trained), reference_tokens=round(passes * (trained + 2 * kl)),
                      extra={"class_weights": weights})


def kto_class_weights(n_desirable: int, n_undesirable: int, ratio: float = 1.0) -> tuple[float, float]:
    """(λ_D, λ_U) for imbalanced binary feedback, as the KTO paper prescribes: keep
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] (Ethayarajh et al. 2024; the paper's example: with one desirable
    per ten undesirable examples, λ_U = 1 and λ_D ∈ [10, 13.33]).

    λ_U stays 1 and λ_D = ratio·n_U/n_D, so the weighted ratio is exactly ``ratio`` (default 1, the lower
    end: balanced data from pairs gives λ_D = λ_U = 1). Pass the result as ``desirable_weight`` and
    ``undesirable_weight``.
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise ValueError(f"KTO needs desirable and undesirable examples; got {n_desirable} and {n_undesirable}")
    if not 1.0 <= ratio <= 4.0 / 3.0:
        raise ValueError(f"the KTO paper keeps λ_D·n_D/(λ_U·n_U) in [1, 4/3]; got ratio={ratio}")
    return ratio * n_undesirable / n_desirable, 1.0
