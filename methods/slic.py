"""SLiC-HF — Sequence Likelihood Calibration with Human Feedback (Zhao et al. 2023, arXiv:2305.10425),
via TRL's DPOTrainer with two losses at once.

Loss (Section 2.2):  L = max(0, δ − log πθ(y_w|x) + log πθ(y_l|x)) − λ·log πθ(y_ref|x)
a rank-calibration hinge with margin δ plus a cross-entropy regularizer toward a target sequence
y_ref (the paper's SFT targets; here the chosen response, the only target the pairs carry).

Mapping onto TRL (``loss_type=["hinge", "sft"]``, ``loss_weights=[1, λ]``):

* TRL's hinge is ``relu(1 − β·Δ)`` = (1/δ)·max(0, δ − Δ) with **β = 1/δ**: the same hinge, scaled by 1/δ.
* TRL's Δ is reference-normalized, (log πθ(y_w) − log π_ref(y_w)) − (log πθ(y_l) − log π_ref(y_l)):
  the RSO form of the SLiC hinge (Liu et al. 2023, arXiv:2309.06657). The paper's Δ has no
  reference terms; TRL's shifts each pair's margin by the reference's own log-ratio. So this
  adapter is reference-based and scores the reference like DPO does.
* TRL's ``sft`` term is the mean NLL per chosen-completion token; the paper's is per sequence.
  λ here weighs a per-token NLL — multiply by the mean chosen length to weigh it as the paper does.

Training goes through ``methods.dpo.train_pairwise``, so SLiC shares DPO's trainer, token
accounting and reference log-prob cache.
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


class SLiC:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "slic", margin: float = 1.0, sft_weight: float = 0.5,
                 learning_rate: float = 5e-7):
        if margin <= 0:
            raise ValueError(f"margin must be positive (TRL's β = 1/margin); got {margin}")
        self.name = name
        self.margin = margin
        self.sft_weight = sft_weight
        self.learning_rate = learning_rate


    def trl_options(self) -> dict:
        """δ and λ as ``DPOConfig`` keyword arguments: β = 1/δ, hinge + λ·sft."""
        return {"beta": 1.0 / self.margin, "loss_type": ["hinge", "sft"], "loss_weights": [1.0, self.sft_weight]}

    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, learning_rate=self.learning_rate, **self.trl_options())
