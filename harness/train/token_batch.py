"""The completion tokens of a micro-batch of pairs as one packed batch of per-position logits, and the plain
functions token-level losses (``methods/tdpo.py``, ``methods/cringe.py``) build on. No TRL here: the losses import this
at the top and stay importable (and testable) without a trainer; ``harness.train.token_level`` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """The completion tokens of a micro-batch of ``pairs`` pairs, packed: entry t is one scored token.

    ``sequence[t]`` is its sequence, 0 … pairs − 1 the chosen completions and pairs … 2·pairs − 1 the rejected ones
    (in pair order); ``logits[t]`` the policy's logits predicting ``labels[t]``; ``reference_logits[t]`` the
    reference's (None unless the loss asks for them)."""

    logits: torch.Tensor             # (tokens, vocabulary), float32
    labels: torch.Tensor             # (tokens,)
    sequence: torch.Tensor           # (tokens,)
    pairs: int
    reference_logits: torch.Tensor | None = None

    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` summed per sequence: shape (2·pairs,), chosen then rejected."""
        return sequence_sums(values, self.sequence, 2 * self.pairs)

    def sequence_lengths(self) -> torch.Tensor:
        return self.sequence_sums(torch.ones_like(self.labels, dtype=torch.float32))


def sequence_sums(values: torch.Tensor, sequence: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of ``values`` over the tokens of each of ``count`` sequences (``sequence`` gives each token's)."""
    return values.new_zeros(count).index_add(0, sequence, values)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of each token under its logits: log_softmax, then the label's entry."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def scored_window(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits predict a completion token of some row (``logits_to_keep``) and, over that window,
    the mask of the positions predicting a completion token of their own row."""
    shift_mask = completion_mask[:, 1:].bool()
    scored = shift_mask.any(dim=0).nonzero().squeeze(-1)
    if scored.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=completion_mask.device), shift_mask[:, :0]
    first, last = int(scored[0]), int(scored[-1])
    return torch.arange(first, last + 1, device=completion_mask.device), shift_mask[:, first:last + 1]
