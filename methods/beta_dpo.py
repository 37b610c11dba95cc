"""β-DPO — DPO with a dynamic β (Wu, Xie, Yang, Wu, Gao, Ding, Wang & He 2024, "β-DPO: Direct
Preference Optimization with Dynamic β", arXiv:2407.08639, NeurIPS 2024; official code
github.com/junkangwu/beta-DPO, ``trainers.py``).

Per batch, with the individual reward discrepancy M_i = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x):

1. running statistics (Sec. 4.1): M_0 ← m·M_0 + (1 − m)·mean_i M_i and σ ← m·σ + (1 − m)·std_i M_i,
   both starting at 0 and updated with the current batch before use;
2. β-guided data filtering (Sec. 4.2): draw ⌊(1 − ρ)·n⌋ of the batch's n pairs without
   replacement with probability ∝ exp(−(M_i − M_0)²/(2σ²)), so pairs whose margin is far from
   the running mean (outliers in either direction) are likely left out;
3. batch-level β (Sec. 4.1): β_batch = β_0·(1 + α·(mean_{i kept} M_i − M_0)), floored at 10⁻³ and
   treated as a constant (no gradient through β);
4. the loss: DPO's eq. 7 with β_batch, averaged over the kept pairs only:
   L = −(1/k)·Σ_{i kept} log σ(β_batch·M_i).

Defaults (``conf/method/beta_dpo.yaml``) follow the official code and README: β_0 = 0.1, α = 0.6,
ρ = 0.2 (``mode_weight``), m = 0.9.

What is simplified, and why:

* "Batch" is the trainer's micro-batch on one process (``budget.micro_batch_pairs``), as in the
  official code, which computes everything per micro-batch — but it also gathers the margins of
  all GPUs first; here there is no all-gather, so on several devices each sees its own micro-batch.
* M_i is taken without β_0, as the official code computes it (``A_gap``); α absorbs the scale.
* σ is floored at ``MIN_STD`` (10⁻³ nats): when every margin of a batch is equal (the first step,
  before the policy moves) the official formula divides by zero.
* The paper's selection probability is normalized over the batch; ``torch.multinomial`` does the
  same with unnormalized weights. Weights that underflow are floored at 10⁻¹², so a batch of only
  outliers is still drawn from (uniformly) rather than failing.
* Draws use a generator seeded with the run's seed, so runs are reproducible.

The per-batch arithmetic lives in pure functions (``update_running``, ``selection_weights``,
``dynamic_beta``, ``beta_dpo_loss``); ``BetaDPOLoss`` holds the running state and the generator.
The section numbers above are those of the arXiv version as we recall them (not checkable offline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise

MIN_STD = 1e-3        # nats; floor on σ (see module docstring)
MIN_BETA = 1e-3       # the official code's floor on β_batch
MIN_WEIGHT = 1e-12    # floor on selection weights, so torch.multinomial always has mass to draw from


def update_running(previous: float, batch_value: float, momentum: float) -> float:
    """Exponential moving average: m·previous + (1 − m)·batch_value."""
    return momentum * previous + (1.0 - momentum) * batch_value


def selection_weights(margins: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Unnormalized selection probability of each pair: exp(−(M_i − M_0)² / (2σ²))."""
    return torch.exp(-((margins - mean) ** 2) / (2.0 * std ** 2))


def dynamic_beta(beta0: float, alpha: float, kept_margin_mean: float, running_mean: float) -> float:
    """β_batch = β_0·(1 + α·(mean of the kept margins − M_0)), floored at MIN_BETA."""
    return max(beta0 * (1.0 + alpha * (kept_margin_mean - running_mean)), MIN_BETA)


def beta_dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                  ref_rejected_logps: torch.Tensor, *, beta: float, keep: torch.Tensor) -> torch.Tensor:
    """Per-pair loss whose batch mean is the kept pairs' mean DPO loss at β: dropped pairs give 0,
    kept pairs −log σ(β·M_i)·n/k (n pairs, k kept)."""
    margins = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    keep = keep.to(margins.dtype)
    return -F.logsigmoid(beta * margins) * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class BetaDPOLoss:
    """The stateful β-DPO loss: running M_0 and σ across batches, seeded draws. One per training run."""

    def __init__(self, *, beta: float, alpha: float, filter_ratio: float, momentum: float, seed: int = 0):
        self.beta0 = beta
        self.alpha = alpha
        self.filter_ratio = filter_ratio
        self.momentum = momentum
        self.margin_mean = 0.0
        self.margin_std = 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics: dict[str, float] = {}

    def __call__(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths=None, rejected_lengths=None) -> torch.Tensor:
        margins = ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)).detach().float().cpu()
        n = margins.numel()
        self.margin_mean = update_running(self.margin_mean, margins.mean().item(), self.momentum)
        self.margin_std = update_running(self.margin_std, margins.std().item() if n > 1 else 0.0, self.momentum)
        weights = selection_weights(margins, self.margin_mean, max(self.margin_std, MIN_STD)).clamp(min=MIN_WEIGHT)
        kept = max(1, int(n * (1.0 - self.filter_ratio) + 1e-9))
        chosen = torch.multinomial(weights, kept, replacement=False, generator=self.generator)
        keep = torch.zeros(n)
        keep[chosen] = 1.0
        beta = dynamic_beta(self.beta0, self.alpha, margins[chosen].mean().item(), self.margin_mean)
        self.metrics = {"beta_dpo/beta": beta, "beta_dpo/margin_mean": self.margin_mean,
                        "beta_dpo/margin_std": self.margin_std, "beta_dpo/kept_fraction": kept / n}
        return beta_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta=beta, keep=keep.to(chosen_logps.device))


class BetaDPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "beta_dpo", beta: float = 0.1, alpha: float = 0.6, filter_ratio: float = 0.2,
                 momentum: float = 0.9, learning_rate: float = 5e-7):
        self.name = name
        self.beta = beta
        self.alpha = alpha
        self.filter_ratio = filter_ratio
        self.momentum = momentum
        self.learning_rate = learning_rate


    def train(self, job: TrainingJob) -> TrainingOutcome:
        loss = BetaDPOLoss(beta=self.beta, alpha=self.alpha, filter_ratio=self.filter_ratio,
                           momentum=self.momentum, seed=job.seed)
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate, pairwise_loss=loss)
