"""TDPO — Token-level Direct Preference Optimization (Zeng, Liu, Ma, Yang, Zhang & Wang 2024, "Token-level Direct
Preference Optimization", arXiv:2404.11999, ICML 2024; official code github.com/Vance0124/Token-level-Direct-Preference-Optimization,
``trainers.py``: ``tdpo_loss`` and ``_tdpo_get_batch_logps``).

DPO's sequence-level reward difference plus a difference of *sequential forward KL divergences*, summed over the
completion's positions t (the paper's D_SeqKL, Sec. 4):

    D_SeqKL(x, y; π_ref ‖ πθ) = Σ_t KL( π_ref(·|x, y<t) ‖ πθ(·|x, y<t) )

    u(x, y_w, y_l) = β·log πθ(y_w|x)/π_ref(y_w|x) − β·log πθ(y_l|x)/π_ref(y_l|x)
    δ(x, y_w, y_l) = β·D_SeqKL(x, y_l; π_ref ‖ πθ) − β·D_SeqKL(x, y_w; π_ref ‖ πθ)

    TDPO1:  L = −E[ log σ( u − δ ) ]
    TDPO2:  L = −E[ log σ( u − α·δ₂ ) ],  δ₂ = β·D_SeqKL(y_l) − sg(β·D_SeqKL(y_w))

with sg a stop-gradient (the chosen side's KL is a constant in TDPO2, so only the rejected side's KL is pushed
down, weighted by α). The official ``tdpo_loss`` computes exactly β·(Δ_w − Δ_l − α·(KL_l − sg(KL_w))) inside the
sigmoid (TDPO1: α = 1, no stop-gradient). The section / equation numbering could not be checked offline; the loss is
the one of the official code named above.

Departures: none in the loss. The reference's per-position distributions come from a reference forward on every
micro-batch (``harness.train.token_level``): they cannot be precomputed and cached like DPO's sequence log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.token_batch import TokenBatch, token_logps

VARIANTS = ("tdpo1", "tdpo2")


def position_forward_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(π_ref(·) ‖ πθ(·)) at each position: Σ_v p_ref(v)·(log p_ref(v) − log pθ(v)); rows are positions."""
    reference_logps = torch.log_softmax(reference_logits, dim=-1)
    return (reference_logps.exp() * (reference_logps - torch.log_softmax(logits, dim=-1))).sum(-1)


def tdpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_seq_kl: torch.Tensor,
              rejected_seq_kl: torch.Tensor, *, beta: float, alpha: float, variant: str) -> torch.Tensor:
    """Per-pair TDPO loss (module docstring): −log σ(β·(Δ_w − Δ_l) − β·(KL_l − KL_w)) for ``tdpo1``,
    −log σ(β·(Δ_w − Δ_l) − α·β·(KL_l − sg(KL_w))) for ``tdpo2``; Δ = log πθ − log π_ref of the sequence,
    KL = D_SeqKL(π_ref ‖ πθ) of the sequence."""
    if variant == "tdpo1":
        kl_gap = rejected_seq_kl - chosen_seq_kl
    else:
        kl_gap = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - kl_gap))


class TDPOLoss:
    """The token loss ``harness.train.token_level`` trains with: sequence log-ratios and D_SeqKL from the packed
    logits of policy and reference, then ``tdpo_loss``."""

    reference_logits = True
    reference_based = True

    def __init__(self, *, beta: float, alpha: float, variant: str):
        self.beta, self.alpha, self.variant = beta, alpha, variant
        self.metrics: dict[str, float] = {}

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        logratios = batch.sequence_sums(token_logps(batch.logits, batch.labels)
                                        - token_logps(batch.reference_logits, batch.labels))
        seq_kl = batch.sequence_sums(position_forward_kl(batch.reference_logits, batch.logits))
        chosen_logratios, rejected_logratios = logratios.chunk(2)
        chosen_kl, rejected_kl = seq_kl.chunk(2)
        self.metrics = {"tdpo/seq_kl_chosen": chosen_kl.mean().item(), "tdpo/seq_kl_rejected": rejected_kl.mean().item()}
        return tdpo_loss(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl, beta=self.beta,
                         alpha=self.alpha, variant=self.variant)


class TDPO:
    data_view = "pairs"
    reference_based = True
    forward_only_ratio = 1.0  # the reference scores every visit's tokens (no cache): what DPO is priced at

    def __init__(self, name: str = "tdpo", variant: str = "tdpo2", beta: float = 0.1, alpha: float = 0.5,
                 learning_rate: float = 5e-7):
        if variant not in VARIANTS:
            raise ValueError(f"tdpo variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        self.name = name
        self.variant = variant
        self.beta = beta
        self.alpha = alpha
        self.learning_rate = learning_rate

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.token_level import train_token_level

        return train_token_level(job, beta=self.beta, learning_rate=self.learning_rate,
                                 token_loss=TDPOLoss(beta=self.beta, alpha=self.alpha, variant=self.variant))
