"""GPO — Generalized Preference Optimization (Tang, Guo, Zheng, Calandriello, Munos, Rowland, Richemond, Valko,
Ávila Pires & Piot 2024, "Generalized Preference Optimization: A Unified Approach to Offline Alignment",
arXiv:2402.05749, ICML 2024).

One offline loss family: a convex function f of the scaled log-ratio difference (the paper's GPO objective),

    L_GPO = E[ f(β·ρ_θ) ],   ρ_θ = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x),

with log-probs summed over the completion's tokens. The convex functions of the paper's Table 1 (``GPO_LOSSES``):

    logistic             log(1 + e^{−ρ})        DPO (Rafailov et al. 2023, eq. 7)
    hinge                max(0, 1 − ρ)          SLiC (Zhao et al. 2023), its reference-normalized (RSO) form
    squared              (ρ − 1)²               IPO (Azar et al. 2023, eq. 17) up to scale, see below
    exponential          e^{−ρ}
    truncated_quadratic  max(0, 1 − ρ)²
    savage               1 / (1 + e^{ρ})²

(ρ here = β·ρ_θ.) **squared vs IPO**: IPO's loss is (ρ_θ − 1/(2τ))²; (β·ρ_θ − 1)² = β²·(ρ_θ − 1/β)², so GPO's
squared loss at β is IPO at τ = β/2 scaled by β² (same minimizer, gradients β² smaller). The harness's ``ipo``
(TRL) also averages the log-ratios per completion token; GPO sums them, as the paper writes ρ_θ. Likewise GPO's
hinge is the harness's ``slic`` hinge term (β = 1/δ) without SLiC's NLL regularizer.

Departures: none in the loss. Table 1's function names and forms are as we recall the paper (not re-checked offline);
each is the standard form of the named convex surrogate, and ``tests/test_own_losses.py`` checks them by hand.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


def _logistic(rho):
    return F.softplus(-rho)


def _hinge(rho):
    return torch.relu(1.0 - rho)


def _squared(rho):
    return (rho - 1.0) ** 2


def _exponential(rho):
    return torch.exp(-rho)


def _truncated_quadratic(rho):
    return torch.relu(1.0 - rho) ** 2


def _savage(rho):
    return torch.sigmoid(-rho) ** 2  # 1/(1 + e^ρ)² = σ(−ρ)², stable for large |ρ|


GPO_LOSSES = {"logistic": _logistic, "hinge": _hinge, "squared": _squared, "exponential": _exponential,
              "truncated_quadratic": _truncated_quadratic, "savage": _savage}


def gpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, *, beta: float, loss: str) -> torch.Tensor:
    """Per-pair GPO loss f(β·ρ_θ), f = ``GPO_LOSSES[loss]`` (module docstring); lengths unused."""
    rho = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return GPO_LOSSES[loss](rho)


class GPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "gpo", loss: str = "logistic", beta: float = 0.1, learning_rate: float = 5e-7):
        if loss not in GPO_LOSSES:
            raise ValueError(f"gpo loss must be one of {', '.join(GPO_LOSSES)}; got {loss!r}")
        self.name = name
        self.loss = loss
        self.beta = beta
        self.learning_rate = learning_rate

    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              pairwise_loss=partial(gpo_loss, beta=self.beta, loss=self.loss))
