"""NPO — Negative Preference Optimization (Zhang, Lin, Bai & Mei 2024, "Negative Preference
Optimization: From Catastrophic Collapse to Effective Unlearning", arXiv:2404.05868).

An unlearning objective: DPO with the preferred side dropped, so only the undesirable responses
y (the forget set) enter (Sec. 3, eq. 3):

    L_NPO,β = −(2/β)·E[ log σ( −β·log πθ(y|x)/π_ref(y|x) ) ]

It pushes πθ(y|x) below π_ref(y|x) with a weight that vanishes as it does, unlike plain gradient
ascent on −log πθ(y|x) (its β → 0 limit), which diverges. Here the forget set is the rejected
side of the preference pairs. (The equation number is from the arXiv version as we recall it; it
could not be checked offline.)

View: the ``pairs`` view, with the chosen side ignored by the loss. That reuses the pair trainer
(and the shared reference cache) unchanged; the cost is that the batch still runs the policy over
the chosen completions (its gradient is zero), so ``policy_tokens`` counts both sides — what the
trainer actually computed. An ``unpaired`` view holding only the undesirable half would halve that
forward cost but needs its own trainer. One pair = one rejected example, so the budget (counted in
pairs) gives NPO the same optimizer steps over the same pairs as DPO.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


def npo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
             *, beta: float) -> torch.Tensor:
    """Per-pair NPO loss on the rejected side: −(2/β)·log σ(−β·(log πθ(y_l) − log π_ref(y_l)))."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (rejected_logps - ref_rejected_logps))


class NPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "npo", beta: float = 0.1, learning_rate: float = 1e-5):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate


    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              pairwise_loss=partial(npo_loss, beta=self.beta))
