"""LiPO-λ — Listwise Preference Optimization with the Lambda loss (Liu, Qin, Wu, Shen, Khalman, Joshi, Zhao,
Saleh, Baumgartner, Liu, Liu & Wang 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank",
arXiv:2402.01878), on the ``lists`` view (``harness.inputs.data``) through the list trainer
(``harness.train.listwise``).

Each of a prompt's K responses gets the DPO implicit reward s_i = β·log πθ(y_i|x)/π_ref(y_i|x); the loss is the
LambdaLoss (Wang et al. 2018) over every ordered pair of the list (the paper's LiPO-λ objective, §3 eq. 8 of
arXiv:2402.01878v3):

    L = Σ_{ψ_i > ψ_j} Δ_ij · log(1 + exp(−(s_i − s_j))),
    Δ_ij = |G_i − G_j| · |1/D(τ(i)) − 1/D(τ(j))|,   G_i = 2^ψ_i − 1,   D(τ) = log2(1 + τ)

ψ the labels (the list's scores, higher better), τ(i) the rank (1 = first) of y_i when the list is sorted by the
policy's current s (no gradient through the ranks or weights). For K = 2 it is DPO's loss with a constant weight.

Departures: D uses log2, NDCG's discount as in LambdaLoss (the paper writes log(1 + τ); the base only scales the
loss by a constant); the loss is summed over a list's pairs and averaged over the lists of a micro-batch; labels
are the list's raw scores (the paper's are a reward-ranking model's; a data set's ``ranks`` become −rank, which
changes G but not the order; the paper's labels ψ_k are mean win rates in [0, 1] from all-pairs comparisons by a
pairwise reward-ranking model, §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from harness.train.listwise import ListMethod


def lambda_weights(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Δ_ij of every (i, j) in each list, shape (B, K, K): |G_i − G_j|·|1/D(τ(i)) − 1/D(τ(j))| with τ the 1-based
    rank of ``rewards`` (descending) and G = 2^score − 1."""
    order = torch.argsort(rewards.detach(), dim=-1, descending=True)
    positions = torch.arange(1, rewards.shape[-1] + 1, device=rewards.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    discount = 1.0 / torch.log2(1.0 + ranks.to(torch.float32))
    gain = torch.pow(2.0, scores.to(torch.float32)) - 1.0
    return (gain[..., :, None] - gain[..., None, :]).abs() * (discount[..., :, None] - discount[..., None, :]).abs()


def lipo_lambda_loss(logps: torch.Tensor, lengths: torch.Tensor, reference_logps: torch.Tensor,
                     scores: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Per-list LiPO-λ loss, shape (B,), from (B, K) summed response log-probs, reference log-probs and scores
    (``lengths`` unused: the loss is on whole-sequence log-ratios)."""
    rewards = beta * (logps - reference_logps)
    weights = lambda_weights(rewards, scores)
    better = (scores[..., :, None] > scores[..., None, :]).to(rewards.dtype)
    pair_losses = -F.logsigmoid(rewards[..., :, None] - rewards[..., None, :])
    return (better * weights * pair_losses).sum(dim=(-1, -2))


@dataclass(eq=False)
class LiPO(ListMethod):
    reference_based = True

    name: str = "lipo"
    beta: float = 0.05
    list_size: int = 8

    def list_loss(self):
        return partial(lipo_lambda_loss, beta=self.beta)
