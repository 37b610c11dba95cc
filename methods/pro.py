"""PRO — Preference Ranking Optimization (Song, Yu, Li, Yu, Huang, Li & Wang 2023, "Preference ranking optimization
for human alignment", arXiv:2306.17492), on the ``lists`` view (``harness.inputs.data``) through the list trainer
(``harness.train.listwise``). Reference-free.

The K responses y^1 ≻ y^2 ≻ ... ≻ y^K of a prompt (sorted by the reward r_φ, best first) are scored by their
length-normalized log-likelihood r_πθ(x, y) = Σ_t log πθ(y_t | x, y_<t) / |y|. PRO is a Plackett–Luce loss: each
response in turn must beat every response ranked below it (§3):

    L_PRO = −Σ_{k=1}^{K−1} log [ exp(r_πθ(x, y^k) / T^k_k) / Σ_{i=k}^{K} exp(r_πθ(x, y^i) / T^i_k) ]
    T^i_k = 1 / (r_φ(x, y^k) − r_φ(x, y^i))  (i > k),    T^k_k = min_{i>k} T^i_k

so a response far below y^k in reward is pushed down harder (the paper's temperature, "PRO" vs "PRO w/o T"). The
total is L = L_PRO + β·L_SFT, L_SFT the negative log-likelihood of the best response y^1.

Departures: L_SFT is the per-token mean NLL (the paper's notation leaves the normalization open; per token as
standard SFT; the authors' code, AlibabaResearch/DAMO-ConvAI ``PRO/train/utils/process_manager.py``, weights the best
response's *summed* NLL by β·(K − 1)², β = ``--sft_weight`` 0.05 in its training scripts); r_φ is the list's scores (a data set's ``ranks`` become −rank); a tie in reward gives 1/T = 0 (the
response enters its softmax with logit 0, as the formula reads at T = ∞); ``temperature_weighting: false`` is the
paper's "w/o T" ablation (all T = 1); the loss is averaged over the lists of a micro-batch. Equations as recalled,
their numbers not re-checked offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from harness.train.listwise import ListMethod


def pro_loss(logps: torch.Tensor, lengths: torch.Tensor, reference_logps, scores: torch.Tensor, *,
             sft_weight: float, temperature_weighting: bool = True) -> torch.Tensor:
    """Per-list PRO loss, shape (B,), from (B, K) summed response log-probs, token counts and scores (any order:
    sorted best first here): L_PRO + sft_weight·(per-token NLL of the best response)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    normalized = (logps / lengths.clamp(min=1)).gather(-1, order)
    rewards = scores.gather(-1, order).to(normalized.dtype)
    total = torch.zeros(logps.shape[:-1], dtype=normalized.dtype, device=logps.device)
    for k in range(scores.shape[-1] - 1):
        if temperature_weighting:
            inverse = rewards[..., k:k + 1] - rewards[..., k + 1:]          # 1/T^i_k, i > k
            own = inverse.max(dim=-1, keepdim=True).values                   # 1/T^k_k = max_i 1/T^i_k
            logits = torch.cat([normalized[..., k:k + 1] * own, normalized[..., k + 1:] * inverse], dim=-1)
        else:
            logits = normalized[..., k:]
        total = total - (logits[..., 0] - torch.logsumexp(logits, dim=-1))
    best = order[..., :1]
    sft = -(logps.gather(-1, best) / lengths.gather(-1, best).clamp(min=1)).squeeze(-1)
    return total + sft_weight * sft


@dataclass(eq=False)
class PRO(ListMethod):
    name: str = "pro"
    sft_weight: float = 0.05
    temperature_weighting: bool = True

    def list_loss(self):
        return partial(pro_loss, sft_weight=self.sft_weight, temperature_weighting=self.temperature_weighting)
