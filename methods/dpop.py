"""DPOP — DPO-Positive (Pal, Karkhanis, Dooley, Roberts, Naidu & White 2024, "Smaug: Fixing Failure
Modes of Preference Optimisation with DPO-Positive", arXiv:2402.13228).

DPO can lower the likelihood of the preferred completion as long as the rejected one falls
faster (the paper's Sec. 3 analysis, worst on pairs with a small edit distance). DPOP adds a
penalty, inside the sigmoid, whenever the policy puts less mass on y_w than the reference does
(Sec. 3, the DPOP loss, eq. 3):

    L_DPOP = −E[ log σ( β·( log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x)
                            − λ·max(0, log π_ref(y_w|x)/πθ(y_w|x)) ) ) ]

λ = 0 is DPO's eq. 7 exactly; while πθ(y_w|x) ≥ π_ref(y_w|x) the penalty is zero and the
gradient is DPO's. (The equation number is from the arXiv version as we recall it; it could not
be checked offline.)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


def dpop_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
              ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              *, beta: float, lambda_: float) -> torch.Tensor:
    """Per-pair DPOP loss: −log σ(β·(Δ_w − Δ_l − λ·max(0, log π_ref(y_w) − log πθ(y_w))))."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    # relu, not clamp: at πθ(y_w) = π_ref(y_w) exactly (every pair at step 0 with precomputed reference
    # log-probs) relu's subgradient is 0, so the first step is DPO's; clamp's is 1 and would fire the λ-term
    penalty = torch.relu(ref_chosen_logps - chosen_logps)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - lambda_ * penalty))


class DPOP:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "dpop", beta: float = 0.3, lambda_: float = 50.0, learning_rate: float = 5e-7):
        self.name = name
        self.beta = beta
        self.lambda_ = lambda_
        self.learning_rate = learning_rate


    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              pairwise_loss=partial(dpop_loss, beta=self.beta, lambda_=self.lambda_))
