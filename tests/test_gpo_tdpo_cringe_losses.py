"""GPO, TDPO and pairwise CRINGE losses (methods/gpo.py, methods/tdpo.py, methods/cringe.py) on values worked by hand
from each paper's equation, and the packing of completion tokens their trainer feeds them (harness/train/token_batch.py).

Values used below (by hand, 6 decimals):
  log(1 + e^(−1)) = 0.313262      e^(−1) = 0.367879      1/(1 + e)² = 1/3.718282² = 0.072329
  log(1 + e^(+1)) = 1.313262      e      = 2.718282      1/(1 + e^(−1))² = 1/1.367879² = 0.534447
  log(1 + e^(−0.3)) = 0.554355    log(1 + e^(−0.4)) = 0.513015
No model, no TRL: these run in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.train.token_batch import TokenBatch, scored_window, sequence_sums
from methods.cringe import (CringeLoss, cringe_token_loss, margin_gate, pairwise_cringe_loss,
                            sample_positive_tokens)
from methods.gpo import GPO_LOSSES, gpo_loss
from methods.tdpo import TDPOLoss, position_forward_kl, tdpo_loss

LOG2 = 0.693147


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# GPO (Tang et al. 2024, Table 1: f(ρ), ρ = β·(log-ratio chosen − log-ratio rejected)) ------------------------------
def gpo_at(rho_theta: float, beta: float, loss: str) -> float:
    # chosen log-ratio rho_theta (−10 vs reference −10 − rho_theta), rejected log-ratio 0
    return gpo_loss(t(-10.0), t(-12.0), t(-10.0 - rho_theta), t(-12.0), beta=beta, loss=loss).item()


@pytest.mark.parametrize("loss, at_plus_1, at_minus_1, at_0", [
    ("logistic", 0.313262, 1.313262, LOG2),          # log(1 + e^(−ρ))
    ("hinge", 0.0, 2.0, 1.0),                        # max(0, 1 − ρ)
    ("squared", 0.0, 4.0, 1.0),                      # (ρ − 1)²
    ("exponential", 0.367879, 2.718282, 1.0),        # e^(−ρ)
    ("truncated_quadratic", 0.0, 4.0, 1.0),          # max(0, 1 − ρ)²
    ("savage", 0.072329, 0.534447, 0.25),            # 1/(1 + e^ρ)²
])
def test_gpo_convex_functions_by_hand(loss, at_plus_1, at_minus_1, at_0):
    # β = 0.5: a log-ratio margin of +2 is ρ = +1, −2 is ρ = −1, 0 is ρ = 0
    assert gpo_at(2.0, 0.5, loss) == pytest.approx(at_plus_1, abs=1e-6)
    assert gpo_at(-2.0, 0.5, loss) == pytest.approx(at_minus_1, abs=1e-6)
    assert gpo_at(0.0, 0.5, loss) == pytest.approx(at_0, abs=1e-6)


def test_gpo_squared_is_ipo_at_half_beta_scaled_by_beta_squared():
    # IPO (Azar et al. 2023, eq. 17) on summed log-ratios: (ρ_θ − 1/(2τ))²; GPO squared at β = β²·IPO at τ = β/2
    generator = torch.Generator().manual_seed(0)
    c, r, rc, rr = -20 * torch.rand(4, 8, generator=generator)
    beta = 0.2
    ipo = ((c - rc) - (r - rr) - 1 / (2 * (beta / 2))) ** 2
    torch.testing.assert_close(gpo_loss(c, r, rc, rr, beta=beta, loss="squared"), beta ** 2 * ipo)


def test_gpo_logistic_is_dpo():
    generator = torch.Generator().manual_seed(1)
    c, r, rc, rr = -20 * torch.rand(4, 8, generator=generator)
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((c - rc) - (r - rr)))  # DPO eq. 7
    torch.testing.assert_close(gpo_loss(c, r, rc, rr, beta=0.1, loss="logistic"), dpo)


def test_gpo_losses_decrease_in_the_margin_up_to_one():
    # every f of Table 1 is non-increasing in ρ up to ρ = 1 (what makes it a preference loss); only the squared loss
    # rises past it (IPO regresses the margin to its target instead of pushing it up for ever)
    rho = torch.linspace(-3, 1, 41)
    for name, f in GPO_LOSSES.items():
        values = f(rho)
        assert torch.all(values[1:] <= values[:-1] + 1e-7), name
    assert GPO_LOSSES["squared"](t(2.0)).item() == pytest.approx(1.0)


def test_gpo_refuses_an_unknown_loss():
    from methods.gpo import GPO

    with pytest.raises(ValueError, match="logistic"):
        GPO(loss="quadratic")


# TDPO (Zeng et al. 2024: u − δ, δ = β·D_SeqKL(y_l) − β·D_SeqKL(y_w); TDPO2 with α and sg on the chosen KL) --------
def test_position_forward_kl_by_hand():
    # π_ref = (½, ½), πθ = (¾, ¼): KL(π_ref‖πθ) = ½·log(½/¾) + ½·log(½/¼) = ½·(−0.405465) + ½·0.693147 = 0.143841
    kl = position_forward_kl(t(0.0, 0.0).unsqueeze(0), t(math.log(3.0), 0.0).unsqueeze(0))
    assert kl.item() == pytest.approx(0.143841, abs=1e-6)
    # equal distributions: 0
    assert position_forward_kl(t(1.0, 2.0).unsqueeze(0), t(1.0, 2.0).unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-7)


def test_tdpo1_and_tdpo2_by_hand():
    # Δ_w = 1, Δ_l = 0, KL_w = 0.2, KL_l = 0.6, β = 0.5
    # TDPO1: z = 0.5·(1 − 0 − (0.6 − 0.2)) = 0.3 → log(1 + e^(−0.3)) = 0.554355
    args = (t(1.0), t(0.0), t(0.2), t(0.6))
    assert tdpo_loss(*args, beta=0.5, alpha=0.5, variant="tdpo1").item() == pytest.approx(0.554355, abs=1e-6)
    # TDPO2, α = 0.5: z = 0.5·(1 − 0.5·(0.6 − 0.2)) = 0.4 → log(1 + e^(−0.4)) = 0.513015
    assert tdpo_loss(*args, beta=0.5, alpha=0.5, variant="tdpo2").item() == pytest.approx(0.513015, abs=1e-6)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    for variant, chosen_kl_moves in (("tdpo1", True), ("tdpo2", False)):
        chosen_kl = t(0.2).requires_grad_()
        rejected_kl = t(0.6).requires_grad_()
        tdpo_loss(t(1.0), t(0.0), chosen_kl, rejected_kl, beta=0.5, alpha=0.5, variant=variant).sum().backward()
        moved = chosen_kl.grad is not None and chosen_kl.grad.abs().item() > 0
        assert moved == chosen_kl_moves, variant
        assert rejected_kl.grad.item() > 0  # a larger rejected KL raises the loss, in both variants


def test_tdpo_loss_on_packed_tokens_by_hand():
    # one pair, one token each, vocabulary 2, β = 1, TDPO1.
    # chosen: πθ = (¾, ¼), π_ref = (½, ½), label 0: Δ_w = log(¾/½) = log 1.5, KL_w = ½·log(4/3) (above)
    # rejected: πθ = π_ref = (½, ½), label 1: Δ_l = 0, KL_l = 0
    # z = log 1.5 + ½·log(4/3) = log(1.5·√(4/3)) = log √3 → loss = log(1 + 1/√3) = log 1.577350 = 0.455746
    batch = TokenBatch(logits=torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]), labels=torch.tensor([0, 1]),
                       sequence=torch.tensor([0, 1]), pairs=1, reference_logits=torch.zeros(2, 2))
    loss = TDPOLoss(beta=1.0, alpha=0.5, variant="tdpo1")(batch)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.455746, abs=1e-6)


# CRINGE (Adolphs et al. 2022: softmax over (s⁺, s⁻)); pairwise form (Xu et al. 2023: L_CE(y_w) + α·g·L_Cr(y_l)) -----
def test_cringe_token_loss_by_hand():
    # logits (2, 0, 1), negative token 0 (s⁻ = 2), positive token 2 (s⁺ = 1):
    # −log(e¹/(e¹ + e²)) = log(1 + e^(2−1)) = 1.313262
    loss = cringe_token_loss(t(2.0, 0.0, 1.0).unsqueeze(0), torch.tensor([0]), torch.tensor([2]))
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_positive_tokens_come_from_the_top_k_without_the_negative():
    logits = t(5.0, 4.0, 3.0, -1.0).unsqueeze(0).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    # k = 1, negative = the top token 0: always the next best, token 1
    assert torch.all(sample_positive_tokens(logits, torch.zeros(4000, dtype=torch.long), 1, generator) == 1)
    # k = 2, negative = token 1: candidates 0 and 2 drawn ∝ softmax(5, 3) = (0.880797, 0.119203)
    draws = sample_positive_tokens(logits, torch.ones(4000, dtype=torch.long), 2, generator)
    assert set(draws.tolist()) <= {0, 2}
    assert (draws == 0).float().mean().item() == pytest.approx(0.880797, abs=0.02)


def test_margin_gate_and_pairwise_cringe_by_hand():
    # g = σ((b − M)/τ): b = −10, τ = 1, M = −10 → σ(0) = 0.5; M = 0 → σ(−10) = 4.54e-5
    assert margin_gate(t(-20.0), t(-10.0), bias=-10.0, temperature=1.0).item() == pytest.approx(0.5, abs=1e-7)
    assert margin_gate(t(-10.0), t(-10.0), bias=-10.0, temperature=1.0).item() == pytest.approx(4.5398e-5, rel=1e-3)
    # b = 0, τ = 2, M = −2 → σ(1) = 0.731059
    assert margin_gate(t(-12.0), t(-10.0), bias=0.0, temperature=2.0).item() == pytest.approx(0.731059, abs=1e-6)
    # L_CE 2 + α 1 · g 0.5 · L_Cr 1.313262 = 2.656631
    assert pairwise_cringe_loss(t(2.0), t(1.313262), t(0.5), alpha=1.0).item() == pytest.approx(2.656631, abs=1e-6)


def test_pairwise_cringe_loss_on_packed_tokens_by_hand():
    # one pair, one token each, vocabulary 3; b = 0, τ = 1, α = 1, k = 1.
    # chosen: logits (0, 0, 0), label 0: L_CE = log 3 = 1.098612, log πθ(y_w) = −1.098612
    # rejected: logits (2, 0, 1), label 0 (the negative); top-1 other than token 0 is token 2 (s⁺ = 1):
    #   L_Cr = log(1 + e^(2 − 1)) = 1.313262; log πθ(y_l) = 2 − log(e² + 1 + e) = 2 − 2.407606 = −0.407606
    # M = −1.098612 + 0.407606 = −0.691006; g = σ((0 + 0.691006)/1) = 0.666191
    # loss = 1.098612 + 0.666191 · 1.313262 = 1.973495
    batch = TokenBatch(logits=torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0]]), labels=torch.tensor([0, 0]),
                       sequence=torch.tensor([0, 1]), pairs=1)
    loss = CringeLoss(top_k=1, alpha=1.0, gate_bias=0.0, gate_temperature=1.0)(batch)
    assert loss.item() == pytest.approx(1.973495, abs=1e-5)


def test_pairwise_cringe_averages_per_token():
    # the same rejected token twice (a 2-token rejected completion) gives the same per-token CRINGE term;
    # the margin doubles the rejected log-likelihood: M = −1.098612 + 2·0.407606 = −0.283400 → g = σ(0.283400) = 0.570378
    batch = TokenBatch(logits=torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [2.0, 0.0, 1.0]]),
                       labels=torch.tensor([0, 0, 0]), sequence=torch.tensor([0, 1, 1]), pairs=1)
    loss = CringeLoss(top_k=1, alpha=1.0, gate_bias=0.0, gate_temperature=1.0)(batch)
    assert loss.item() == pytest.approx(1.098612 + 0.570378 * 1.313262, abs=1e-5)


# packing (harness/train/token_batch.py) ------------------------------------------------------------------------------
def test_scored_window_and_sequence_sums():
    # two rows (right-padded): row 0 prompt 2 + completion 2 tokens, row 1 prompt 1 + completion 3 tokens
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]])
    positions, mask = scored_window(completion_mask)
    # logits at position p predict token p + 1: completions start at token 2 (row 0) / 1 (row 1) → positions 0 … 2
    assert positions.tolist() == [0, 1, 2]
    assert mask.tolist() == [[False, True, True], [True, True, True]]
    rows = torch.arange(2).unsqueeze(1).expand_as(mask)[mask]
    assert rows.tolist() == [0, 0, 1, 1, 1]
    assert sequence_sums(t(1, 2, 3, 4, 5), rows, 2).tolist() == [3.0, 12.0]


def test_packed_logits_score_what_trls_fused_head_scores(tiny_model):
    """The token-level trainer's logits (``logits_to_keep`` over the scored window, packed by the completion mask) give
    the same sequence log-probs as TRL's fused LM head, which DPO's log-ratios come from."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from harness.train.token_batch import token_logps
    from harness.train.token_level import TokenLevelDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    add_fused_lm_head(model)
    # right-padded [chosen; rejected] rows of different prompt and completion lengths, as TRL's collator makes them
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 10, 11, 0, 0], [5, 6, 7, 12, 0, 0], [5, 6, 13, 14, 15, 16]])
    attention_mask = (torch.arange(6) < torch.tensor([[5], [4], [4], [6]])).long()
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    with torch.no_grad():
        fused = model(**kwargs, labels=input_ids.masked_fill(completion_mask == 0, -100), fused_lm_head=True)
        expected = fused.log_probs.sum(dim=1)
        positions, mask = scored_window(completion_mask)
        logits = TokenLevelDPOTrainer._logits(None, model, kwargs, positions, mask)
    labels = input_ids[:, 1:][:, positions][mask]
    rows = torch.arange(4).unsqueeze(1).expand_as(mask)[mask]
    assert logits.shape == (int(completion_mask[:, 1:].sum()), model.config.vocab_size)
    torch.testing.assert_close(sequence_sums(token_logps(logits, labels), rows, 4), expected, atol=1e-5, rtol=1e-5)


def test_flops_matching_prices_tdpos_reference_and_not_cringes():
    """``budget.match=flops``: TDPO's reference forward on every visit is priced like DPO's reference (2·N a token),
    reference-free CRINGE like SimPO (tests/test_matching_and_learning.py::test_matched_visits_by_hand's numbers)."""
    from harness.train.budget import Budget
    from harness.train.matching import matched_visits
    from methods.cringe import Cringe
    from methods.tdpo import TDPO

    budget = Budget(name="b", pairs=4, epochs=1, max_prompt_tokens=8, max_completion_tokens=8, batch_pairs=1,
                    micro_batch_pairs=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
                    weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="fp32", match="flops")
    lengths = [(10, 5, 5)] * 4
    # target 4 visits × (6 + 2)·30 = 960; TDPO pays (6 + 2)·30 = 240 a visit → 4; CRINGE 6·30 = 180 → 5.33 → 5
    assert matched_visits(budget, TDPO(), lengths) == 4
    assert matched_visits(budget, Cringe(), lengths) == 5
