"""RRHF — Rank Responses to align Human Feedback (Yuan, Yuan, Tan, Wang, Huang & Huang 2023, "RRHF: Rank responses
to align language models with human feedback without tears", arXiv:2304.05302), on the ``lists`` view
(``harness.inputs.data``) through the list trainer (``harness.train.listwise``). Reference-free.

Each of a prompt's K responses y_i, with reward r_i, is scored by its length-normalized log-likelihood
p_i = Σ_t log πθ(y_{i,t} | x, y_{i,<t}) / |y_i| (§3). The loss (§3, L = L_rank + L_ft):

    L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)                      (a worse response must not score higher)
    L_ft   = −Σ_t log πθ(y_{i',t} | x, y_{i',<t}),  i' = argmax_i r_i   (cross-entropy on the best response)

Departures: ``rank_weight`` and ``sft_weight`` weigh the two terms (1 and 1, the paper's equation and the authors'
training scripts: GanjinZero/RRHF ``train.sh`` passes ``--rrhf_weight 1``, ``train.py``'s field default being 100;
``train.py`` averages its SFT term over the best response's padded token positions where L_ft here sums); the loss
is averaged over the lists of a micro-batch. Equation numbers not re-checked offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from harness.train.listwise import ListMethod


def rrhf_loss(logps: torch.Tensor, lengths: torch.Tensor, reference_logps, scores: torch.Tensor, *,
              rank_weight: float = 1.0, sft_weight: float = 1.0) -> torch.Tensor:
    """Per-list RRHF loss, shape (B,), from (B, K) summed response log-probs, token counts and scores:
    rank_weight·Σ_{r_i<r_j} max(0, p_i − p_j) + sft_weight·(−log πθ(y_best|x)), p = log-prob / length."""
    normalized = logps / lengths.clamp(min=1)
    worse = (scores[..., :, None] < scores[..., None, :]).to(logps.dtype)  # [i, j]: r_i < r_j
    rank = (worse * torch.relu(normalized[..., :, None] - normalized[..., None, :])).sum(dim=(-1, -2))
    best = scores.argmax(dim=-1, keepdim=True)
    sft = -logps.gather(-1, best).squeeze(-1)
    return rank_weight * rank + sft_weight * sft


@dataclass(eq=False)
class RRHF(ListMethod):
    name: str = "rrhf"
    rank_weight: float = 1.0
    sft_weight: float = 1.0

    def list_loss(self):
        return partial(rrhf_loss, rank_weight=self.rank_weight, sft_weight=self.sft_weight)
