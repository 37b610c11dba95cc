"""cDPO — conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to
IPO", https://ericmitchell.ai/cdpo.pdf), via TRL's DPOTrainer.

Loss (eq. 3), with ε the probability that a preference label is flipped:
  L = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ),   Δ = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)

Why an adapter and not a ``loss_type`` alias: TRL ≤ 0.x computed this as ``sigmoid`` with
``label_smoothing = ε``, but in TRL 1.16 the ``sigmoid`` loss ignores ``label_smoothing``
(``DPOTrainer._compute_loss``: ``-F.logsigmoid(self.beta * delta_score)``), so that alias would
silently train plain DPO. TRL 1.16's ``robust`` loss (Chowdhury et al. 2024) is

  L_robust(ε') = [ −(1 − ε')·log σ(βΔ) + ε'·log σ(−βΔ) ] / (1 − 2ε')

and with ε' = −ε/(1 − 2ε) it equals the cDPO loss exactly (1 − ε' = (1 − ε)/(1 − 2ε) and
1 − 2ε' = 1/(1 − 2ε)). This adapter takes ε and trains ``methods.dpo.DPO`` with that ε'. TRL logs a
warning that ``label_smoothing`` lies outside [0, 0.5) for ``robust``; it is expected here.
"""

from __future__ import annotations

import math

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import PairwiseRound


def conservative_dpo_loss(margin: float, epsilon: float) -> float:
    """cDPO's per-pair loss (Mitchell 2023, eq. 3) at ``margin`` = β·Δ: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)."""
    return (1 - epsilon) * math.log1p(math.exp(-margin)) + epsilon * math.log1p(math.exp(margin))


def robust_label_smoothing_for(epsilon: float) -> float:
    """TRL ``robust`` label smoothing ε' whose loss equals cDPO's at flip probability ε: ε' = −ε/(1 − 2ε)."""
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"cDPO's label noise ε must lie in [0, 0.5); got {epsilon}")
    return -epsilon / (1.0 - 2.0 * epsilon)


class CDPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "cdpo", beta: float = 0.1, learning_rate: float = 5e-7, label_noise: float = 0.1):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.label_noise = label_noise
        self.dpo = PairwiseRound(beta=beta, learning_rate=learning_rate, loss_type="robust",
                                 label_smoothing=robust_label_smoothing_for(label_noise))


    def train(self, job: TrainingJob) -> TrainingOutcome:
        return self.dpo.train(job)
