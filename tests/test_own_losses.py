"""The losses the harness holds itself (TRL 1.16 lacks them), checked on values worked by hand.

Notation: −log σ(z) = log(1 + e^(−z)). Values used below:
  log 2             = 0.693147
  log(1 + e^(−1))   = log 1.367879 = 0.313262
  log(1 + e^(+1))   = log 3.718282 = 1.313262
  log(1 + e^(+2))   = log 8.389056 = 2.126928
No model, no TRL: these run in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.beta_dpo import BetaDPOLoss, beta_dpo_loss, dynamic_beta, selection_weights, update_running
from methods.dpop import dpop_loss
from methods.npo import npo_loss
from methods.rdpo import rdpo_loss
from methods.sdpo import split_at_batches

LOG2 = 0.693147
SOFTPLUS_MINUS_1 = 0.313262   # −log σ(1)
SOFTPLUS_1 = 1.313262         # −log σ(−1)
SOFTPLUS_2 = 2.126928         # −log σ(−2)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def dpo_eq7(chosen, rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023, eq. 7), written out independently of the methods under test."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def random_batch(seed=0, n=6):
    generator = torch.Generator().manual_seed(seed)
    logps = -20 * torch.rand(4, n, generator=generator)
    lengths = torch.randint(1, 60, (2, n), generator=generator)
    return (*logps, *lengths)


# R-DPO ---------------------------------------------------------------------------------
def test_rdpo_adds_the_length_gap_inside_the_sigmoid():
    # log-ratios: chosen −10 − (−11) = 1, rejected −12 − (−13) = 1 → β·(1 − 1) = 0
    # length term α(|y_w| − |y_l|) = 0.1·(12 − 2) = +1 → −log σ(0 + 1) = 0.313262
    loss = rdpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-13.0), t(12), t(2), beta=0.5, alpha=0.1)
    assert loss.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-6)
    # a longer *rejected* answer flips the sign: 0.1·(2 − 12) = −1 → −log σ(−1) = 1.313262
    loss = rdpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-13.0), t(2), t(12), beta=0.5, alpha=0.1)
    assert loss.item() == pytest.approx(SOFTPLUS_1, abs=1e-6)


def test_rdpo_with_alpha_zero_is_dpo():
    # the same pair without the length term: −log σ(0) = log 2
    assert rdpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-13.0), t(12), t(2), beta=0.5, alpha=0.0).item() == pytest.approx(LOG2, abs=1e-6)
    c, r, rc, rr, lc, lr = random_batch()
    torch.testing.assert_close(rdpo_loss(c, r, rc, rr, lc, lr, beta=0.1, alpha=0.0), dpo_eq7(c, r, rc, rr, 0.1))


# DPOP ----------------------------------------------------------------------------------
def test_dpop_penalises_a_chosen_logprob_below_the_reference():
    # chosen fell from −10 (reference) to −12: log-ratio −2; rejected unchanged: log-ratio 0
    # penalty max(0, −10 − (−12)) = 2; β = 0.5, λ = 1: z = 0.5·(−2 − 0 − 1·2) = −2 → −log σ(−2) = 2.126928
    loss = dpop_loss(t(-12.0), t(-12.0), t(-10.0), t(-12.0), t(5), t(5), beta=0.5, lambda_=1.0)
    assert loss.item() == pytest.approx(SOFTPLUS_2, abs=1e-6)
    # without the penalty (λ = 0) it is DPO: z = 0.5·(−2) = −1 → 1.313262
    loss = dpop_loss(t(-12.0), t(-12.0), t(-10.0), t(-12.0), t(5), t(5), beta=0.5, lambda_=0.0)
    assert loss.item() == pytest.approx(SOFTPLUS_1, abs=1e-6)


def test_dpop_is_dpo_while_the_chosen_logprob_is_above_the_reference():
    # chosen rose from −12 to −10: penalty max(0, −12 − (−10)) = 0 whatever λ; z = 0.5·(2 − 0) = 1 → 0.313262
    loss = dpop_loss(t(-10.0), t(-12.0), t(-12.0), t(-12.0), t(5), t(5), beta=0.5, lambda_=50.0)
    assert loss.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-6)
    c, r, rc, rr, lc, lr = random_batch(1)
    torch.testing.assert_close(dpop_loss(c, r, rc, rr, lc, lr, beta=0.3, lambda_=0.0), dpo_eq7(c, r, rc, rr, 0.3))


def test_dpop_penalty_has_no_gradient_where_policy_equals_reference():
    # at step 0 (policy = reference) the hinge sits exactly at 0: the gradient must be DPO's, not DPO's + λ·∇
    chosen = t(-10.0).requires_grad_()
    dpop_loss(chosen, t(-12.0), t(-10.0), t(-12.0), t(5), t(5), beta=0.5, lambda_=50.0).sum().backward()
    reference = t(-10.0).requires_grad_()
    dpo_eq7(reference, t(-12.0), t(-10.0), t(-12.0), 0.5).sum().backward()
    # d/dc −log σ(0.5·(c − c_ref)) at c = c_ref: −0.5·σ(0) = −0.25
    assert chosen.grad.item() == pytest.approx(-0.25) and reference.grad.item() == pytest.approx(-0.25)


# NPO -----------------------------------------------------------------------------------
def test_npo_uses_the_rejected_side_only():
    # rejected log-ratio −12 − (−10) = −2; β = 0.5: −(2/0.5)·log σ(−0.5·(−2)) = 4·(−log σ(1)) = 4·0.313262 = 1.253047
    loss = npo_loss(t(-3.0), t(-12.0), t(-40.0), t(-10.0), t(1), t(1), beta=0.5)
    assert loss.item() == pytest.approx(4 * SOFTPLUS_MINUS_1, abs=1e-5)
    # the chosen side does not enter: any chosen values give the same loss
    assert npo_loss(t(-99.0), t(-12.0), t(-1.0), t(-10.0), t(7), t(1), beta=0.5).item() == pytest.approx(loss.item())
    # untrained policy (log-ratio 0): (2/β)·log 2, e.g. β = 0.1 → 20·0.693147 = 13.862944
    assert npo_loss(t(0.0), t(-5.0), t(0.0), t(-5.0), t(1), t(1), beta=0.1).item() == pytest.approx(20 * LOG2, abs=1e-4)


def test_npo_gradient_pushes_the_rejected_logprob_down_and_vanishes_as_it_falls():
    # d/dr −(2/β)·log σ(−β·r) = 2·σ(β·r): at r = 0 it is 2·0.5 = 1; at r = −40, β = 0.5: 2·σ(−20) ≈ 4e-9
    near = t(-5.0).requires_grad_()
    npo_loss(t(0.0), near, t(0.0), t(-5.0), t(1), t(1), beta=0.5).sum().backward()
    far = t(-45.0).requires_grad_()
    npo_loss(t(0.0), far, t(0.0), t(-5.0), t(1), t(1), beta=0.5).sum().backward()
    assert near.grad.item() == pytest.approx(1.0) and 0 < far.grad.item() < 1e-8


# β-DPO ---------------------------------------------------------------------------------
def test_beta_dpo_running_statistics():
    # m = 0.9: 0.9·0 + 0.1·1 = 0.1, then 0.9·0.1 + 0.1·2 = 0.29
    assert update_running(0.0, 1.0, 0.9) == pytest.approx(0.1)
    assert update_running(0.1, 2.0, 0.9) == pytest.approx(0.29)


def test_beta_dpo_dynamic_beta():
    # β_0 = 0.1, α = 0.6, kept mean margin 1.5, M_0 = 0.5: 0.1·(1 + 0.6·1.0) = 0.16
    assert dynamic_beta(0.1, 0.6, 1.5, 0.5) == pytest.approx(0.16)
    # a batch below the running mean lowers β: 0.1·(1 + 0.6·(0 − 0.5)) = 0.07
    assert dynamic_beta(0.1, 0.6, 0.0, 0.5) == pytest.approx(0.07)
    # 0.1·(1 + 0.6·(−2 − 0)) = −0.02 → floored at 1e-3 (the official code's floor)
    assert dynamic_beta(0.1, 0.6, -2.0, 0.0) == pytest.approx(1e-3)


def test_beta_dpo_selection_weights_are_gaussian_around_the_running_mean():
    # margins 0, 1, 2 around M_0 = 1 with σ = 1: exp(−1/2), exp(0), exp(−1/2) = 0.606531, 1, 0.606531
    weights = selection_weights(t(0.0, 1.0, 2.0), 1.0, 1.0)
    torch.testing.assert_close(weights, t(0.606531, 1.0, 0.606531), atol=1e-6, rtol=0)
    # σ = 2 widens it: exp(−1/8) = 0.882497
    assert selection_weights(t(0.0), 1.0, 2.0).item() == pytest.approx(0.882497, abs=1e-6)


def test_beta_dpo_loss_averages_over_the_kept_pairs():
    # margins: (−10 + 11) − (−12 + 13) = 0 and (−8 + 11) − (−13 + 12) = 4; keep only the first, β = 0.5
    # kept: −log σ(0) = log 2, scaled by n/k = 2/1 → 1.386294; dropped → 0; batch mean = log 2
    losses = beta_dpo_loss(t(-10.0, -8.0), t(-12.0, -13.0), t(-11.0, -11.0), t(-13.0, -12.0), beta=0.5, keep=t(1.0, 0.0))
    torch.testing.assert_close(losses, t(2 * LOG2, 0.0), atol=1e-6, rtol=0)
    assert losses.mean().item() == pytest.approx(LOG2, abs=1e-6)


def test_beta_dpo_loss_object_updates_its_state_batch_by_batch():
    loss = BetaDPOLoss(beta=0.1, alpha=0.6, filter_ratio=0.0, momentum=0.9, seed=0)
    zero = t(0.0, 0.0)
    # batch 1, margins 1 and 3 (chosen log-ratio; rejected and references 0):
    #   M_0 = 0.1·mean(1, 3) = 0.2;  σ = 0.1·std(1, 3) = 0.1·√2 = 0.141421 (unbiased std, as the official code)
    #   ρ = 0 keeps both; β = 0.1·(1 + 0.6·(2 − 0.2)) = 0.208
    #   losses −log σ(0.208·1), −log σ(0.208·3) = log(1 + e^−0.208), log(1 + e^−0.624) = 0.594545, 0.429049
    losses = loss(t(1.0, 3.0), zero, zero, zero)
    assert loss.margin_mean == pytest.approx(0.2) and loss.margin_std == pytest.approx(0.141421, abs=1e-6)
    assert loss.metrics["beta_dpo/beta"] == pytest.approx(0.208)
    torch.testing.assert_close(losses, t(0.594545, 0.429049), atol=1e-6, rtol=0)
    # batch 2, margins 0 and 0: M_0 = 0.9·0.2 = 0.18; σ = 0.9·0.141421 = 0.127279; β = 0.1·(1 + 0.6·(0 − 0.18)) = 0.0892
    losses = loss(zero, zero, zero, zero)
    assert loss.margin_mean == pytest.approx(0.18) and loss.margin_std == pytest.approx(0.127279, abs=1e-6)
    assert loss.metrics["beta_dpo/beta"] == pytest.approx(0.0892)
    torch.testing.assert_close(losses, t(LOG2, LOG2), atol=1e-6, rtol=0)


def test_beta_dpo_filter_drops_the_outlier():
    # margins 0, 0, 0, 100: M_0 = 0.1·25 = 2.5, σ = 0.1·std = 0.1·50 = 5
    # weights: exp(−(2.5/5)²/2) = exp(−0.125) = 0.88 for the zeros, exp(−(97.5/5)²/2) = exp(−190) ≈ 0 for 100
    # ρ = 0.25 keeps ⌊0.75·4⌋ = 3 pairs: the three zeros, each scaled by 4/3; the outlier contributes 0
    loss = BetaDPOLoss(beta=0.1, alpha=0.6, filter_ratio=0.25, momentum=0.9, seed=0)
    zero = torch.zeros(4)
    losses = loss(t(0.0, 0.0, 0.0, 100.0), zero, zero, zero)
    assert loss.metrics["beta_dpo/kept_fraction"] == 0.75
    assert losses[3].item() == 0.0
    # kept mean margin 0: β = 0.1·(1 + 0.6·(0 − 2.5)) = −0.05 → floor 1e-3; loss log 2 · 4/3 = 0.924196
    torch.testing.assert_close(losses[:3], torch.full((3,), LOG2 * 4 / 3), atol=1e-5, rtol=0)


def test_beta_dpo_keeps_at_least_one_pair():
    # ⌊0.8·1⌋ = 0 would leave nothing to learn from; a one-pair micro-batch keeps its pair
    loss = BetaDPOLoss(beta=0.1, alpha=0.6, filter_ratio=0.2, momentum=0.9, seed=0)
    assert loss(t(1.0), t(0.0), t(0.0), t(0.0)).item() > 0 and loss.metrics["beta_dpo/kept_fraction"] == 1.0


# sDPO chunking ----------------------------------------------------------------------------
@pytest.mark.parametrize("rows, chunks, batch, sizes", [
    (4, 2, 2, [2, 2]),        # two batches of 2 → one batch per chunk
    (5, 2, 2, [4, 1]),        # batches 2 + 2 + 1 → chunks of two batches and one (partial) batch
    (7, 3, 2, [4, 2, 1]),     # four batches over three chunks: 2, 1, 1 batches
    (4, 2, 4, [4]),           # one batch cannot be split without adding an optimizer step
    (8, 2, 4, [4, 4]),
])
def test_sdpo_chunks_hold_whole_batches_and_keep_the_step_count(rows, chunks, batch, sizes):
    parts = split_at_batches(list(range(rows)), chunks, batch)
    assert [len(p) for p in parts] == sizes
    assert sum(parts, []) == list(range(rows))  # every pair once, in order
    steps = sum(math.ceil(len(p) / batch) for p in parts)
    assert steps == math.ceil(rows / batch)     # DPO's optimizer steps per epoch
