"""R-DPO — length-regularized DPO (Park, Rafailov, Ermon & Finn 2024, "Disentangling Length from
Quality in Direct Preference Optimization", arXiv:2403.19159, Findings of ACL 2024).

The paper adds a length penalty α|y| to the reward of the KL-regularized RL objective,
max E[r(x, y) − α|y|] − β·KL(πθ‖π_ref), and re-derives DPO from it (Sec. 4, the R-DPO objective):

    L_R-DPO = −E[ log σ( β·log πθ(y_w|x)/π_ref(y_w|x) − β·log πθ(y_l|x)/π_ref(y_l|x)
                         + α·(|y_w| − |y_l|) ) ]

with |y| the completion's token count. Sign: the optimal policy of the penalized objective is
π* ∝ π_ref·exp((r − α|y|)/β), so r = β·log π*/π_ref + α|y| + const and the Bradley-Terry margin
r_w − r_l gains **+α(|y_w| − |y_l|)**: when the preferred answer is the longer one, length already
explains part of the preference and the policy is pushed less to lengthen its answers. SimPO
(Meng et al. 2024, arXiv:2405.14734, Table 3) lists R-DPO with the same sign. (A minus sign would
reward verbosity instead of removing it.) α = 0 is DPO's eq. 7 exactly. The equation number in
the paper could not be checked offline; the loss above is the one the paper's Sec. 4 derives.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


def rdpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
              ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              *, beta: float, alpha: float) -> torch.Tensor:
    """Per-pair R-DPO loss: −log σ(β·(Δ_w − Δ_l) + α·(|y_w| − |y_l|)), Δ = log πθ − log π_ref."""
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    length_gap = (chosen_lengths - rejected_lengths).to(margin.dtype)
    return -F.logsigmoid(margin + alpha * length_gap)


class RDPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "rdpo", beta: float = 0.1, alpha: float = 0.01, learning_rate: float = 5e-7):
        self.name = name
        self.beta = beta
        self.alpha = alpha
        self.learning_rate = learning_rate


    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              pairwise_loss=partial(rdpo_loss, beta=self.beta, alpha=self.alpha))
