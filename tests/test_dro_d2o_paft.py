"""DRO, D2O and PAFT (issue 15): their own losses on values worked by hand from the papers' equations, PAFT's merge of
two adapters, and DRO on binary feedback and D2O's priced sampling through the real CLI. (Their learning on the toy
preference set: tests/test_matching_and_learning.py::test_every_method_learns_the_toy_preference.)

Notation as tests/test_own_losses.py: −log σ(1) = 0.313262, −log σ(−1) = 1.313262.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from harness.records import read_records
from methods.d2o import D2O, d2o_loss
from methods.dro import dro_loss, dro_losses
from methods.paft import PAFT, sft_l1_penalty

SOFTPLUS_MINUS_1 = 0.313262   # −log σ(1)
SOFTPLUS_1 = 1.313262         # −log σ(−1)
TINY_BINARY = ["model=tiny-random", "data=toy-binary-feedback", "budget=toy", "budget@stage_budget=toy",
               "settings=[instruct]"]


def read_curves(folder, run_id) -> list[dict]:
    import json

    return [json.loads(line) for line in (folder / "curves" / f"{run_id}.jsonl").read_text().splitlines()]


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# DRO (Richemond et al. 2024): L = ½(r − V(x) − τ·log πθ/π_ref)² ----------------------------------------------------
def test_dro_loss_is_the_papers_squared_residual():
    # r = 1, V = 0.5, τ = 1, log-ratio −10 − (−10.5) = 0.5: residual 1 − 0.5 − 0.5 = 0 → 0
    # r = 0, V = 0.5, τ = 2, log-ratio −10 − (−10.25) = 0.25: residual 0 − 0.5 − 0.5 = −1 → ½
    assert dro_loss(t(-10.0), t(-10.5), t(0.5), t(1.0), tau=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert dro_loss(t(-10.0), t(-10.25), t(0.5), t(0.0), tau=2.0).item() == pytest.approx(0.5, abs=1e-6)


def test_dro_v_gradients_are_the_squared_losss_policy_over_tau_and_value():
    # r = 0, V = 0.5, τ = 2, log π = −10, log π_ref = −10.25 (log-ratio 0.25, residual −1):
    # ∂L/∂log π = residual·(−τ) = 2, so the policy loss's gradient is 2 / τ = 1 = −(r − V) + τ·log-ratio = 0.5 + 0.5;
    # ∂L/∂V = −residual = 1. Values: policy −(−10)·(0 − 0.5) + (2/2)·0.25² = −5 + 0.0625; value ½·(−1)² = 0.5.
    logp, value = t(-10.0).requires_grad_(), t(0.5).requires_grad_()
    policy_loss, value_loss = dro_losses(logp, t(-10.25), value, t(0.0), tau=2.0)
    assert policy_loss.item() == pytest.approx(-4.9375, abs=1e-5)
    assert value_loss.item() == pytest.approx(0.5, abs=1e-6)
    (policy_loss + value_loss).sum().backward()
    assert logp.grad.item() == pytest.approx(1.0, abs=1e-6)
    assert value.grad.item() == pytest.approx(1.0, abs=1e-6)
    # against autograd of the paper's loss itself: policy gradient = (∂L/∂log π) / τ, value gradient = ∂L/∂V
    logp2, value2 = t(-10.0).requires_grad_(), t(0.5).requires_grad_()
    dro_loss(logp2, t(-10.25), value2, t(0.0), tau=2.0).sum().backward()
    assert logp.grad.item() == pytest.approx(logp2.grad.item() / 2.0, abs=1e-6)
    assert value.grad.item() == pytest.approx(value2.grad.item(), abs=1e-6)


# D2O (Duan et al. 2024): −log σ((β/K)·Σ_k log-ratio(y_k) − α·log-ratio(y_l)) ----------------------------------------
def test_d2o_loss_averages_the_samples_log_ratios_inside_the_sigmoid():
    # K = 2 samples with log-ratios 1 and 3 (mean 2), the negative's log-ratio 1
    samples, samples_ref = t(-9.0, -7.0).view(1, 2), t(-10.0, -10.0).view(1, 2)
    # β = α = 1: 2 − 1 = 1 → −log σ(1)
    assert d2o_loss(samples, samples_ref, t(-4.0), t(-5.0), beta=1.0, alpha=1.0).item() == pytest.approx(
        SOFTPLUS_MINUS_1, abs=1e-6)
    # β = 0.5, α = 2: 0.5·2 − 2·1 = −1 → −log σ(−1)
    assert d2o_loss(samples, samples_ref, t(-4.0), t(-5.0), beta=0.5, alpha=2.0).item() == pytest.approx(
        SOFTPLUS_1, abs=1e-6)
    # not the mean of per-sample DPO losses: −log σ(0) and −log σ(2) average to 0.409..., not 0.313
    per_sample = -F.logsigmoid(t(0.0, 2.0)).mean().item()
    assert per_sample == pytest.approx(0.4100, abs=1e-3) and per_sample != pytest.approx(SOFTPLUS_MINUS_1, abs=1e-3)


def test_d2o_with_one_sample_and_alpha_equal_beta_is_dpo_against_the_sample():
    generator = torch.Generator().manual_seed(0)
    sample, sample_ref, rejected, rejected_ref = (-20 * torch.rand(4, generator=generator) for _ in range(4))
    dpo = -F.logsigmoid(0.1 * ((sample - sample_ref) - (rejected - rejected_ref)))
    d2o = d2o_loss(sample[:, None], sample_ref[:, None], rejected, rejected_ref, beta=0.1, alpha=0.1)
    assert torch.allclose(d2o, dpo, atol=1e-6)


def test_d2o_prices_its_samples():
    # a visit with 10 prompt and 6 completion tokens, K = 4: 5 sequences trained; 5 scored by the reference + 4 generated
    assert D2O(samples=4).visit_cost(10, 6, None, None) == (80.0, 80.0 + 64.0)


# PAFT (Pentyala et al. 2024): L_sft + λ·‖δ_sft‖₁, then the adapters merged ------------------------------------------
def test_paft_l1_penalty_is_lambda_times_the_absolute_sum():
    # |1| + |−2| + |0.5| = 3.5; λ = 0.1 → 0.35
    assert sft_l1_penalty([t(1.0, -2.0), t(0.5)], 0.1).item() == pytest.approx(0.35, abs=1e-6)


def test_paft_merges_two_adapters_into_the_start_weights(tmp_path, tiny_model):
    """With ``svd`` at rank r₁ + r₂ the merge is exact: W + s·(w₁·B₁A₁ + w₂·B₂A₂) — the plumbing (adapters loaded,
    combined, merged, saved as a full checkpoint) checked against the deltas computed by hand."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    deltas = {}
    for seed, name in ((1, "sft"), (2, "dpo")):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
        torch.manual_seed(seed)
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.data = torch.randn_like(parameter) * 0.1
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        deltas[name] = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0).detach()
        model.save_pretrained(tmp_path / "adapters" / name)
    job = SimpleNamespace(start_checkpoint=tiny_model, output_dir=tmp_path / "out")
    record = PAFT(combination_type="svd", weights=[1.0, 0.5]).merge(job, tmp_path / "adapters")
    assert record["svd_rank"] == 4 and record["adapter_ranks"] == [2, 2]
    start = load_file(next(tiny_model.glob("*.safetensors")))
    merged = load_file(next((tmp_path / "out").glob("*.safetensors")))
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = start[key] + deltas["sft"] + 0.5 * deltas["dpo"]
    assert torch.allclose(merged[key], expected, atol=1e-4)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], start["model.layers.0.self_attn.k_proj.weight"])


def test_paft_refuses_an_unknown_merge():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="combination_type='mean'; choose one of"):
        PAFT(combination_type="mean")


# through the CLI -------------------------------------------------------------------------------------------------------
def test_dro_trains_on_binary_feedback_through_the_cli(tmp_path, cache_dir):
    result = run_cli("sweep", *TINY_BINARY, "methods=[dro]", "tasks=[heldout_preference]",
                     "+method_params.dro.learning_rate=1e-3", f"paths.results={tmp_path}", "name=b", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "b")}
    assert all(r["status"] == "ok" for r in records.values())
    consumed = records["dro"]["consumed"]
    # budget=toy: 32 pairs = 64 examples in 8 steps, as KTO; the binary rows as they come (one desirable in three)
    assert (consumed["examples"], consumed["pairs"], consumed["optimizer_steps"]) == (64, 32, 8)
    assert consumed["desirable_examples"] + consumed["undesirable_examples"] == 64
    assert consumed["desirable_examples"] < consumed["undesirable_examples"]
    assert consumed["policy_tokens"] == consumed["reference_tokens"] > 0  # one pass each over the 64 examples
    # held out: the trained implicit reward ranks desirable above undesirable examples (AUC), better than chance
    assert records["dro"]["metrics"]["logratio_accuracy"]["value"] > 0.75, records["dro"]["metrics"]
    curves = read_curves(tmp_path / "b", records["dro"]["run_id"])
    assert curves[-1]["loss"] < curves[0]["loss"], [c["loss"] for c in curves]


def test_d2o_records_its_generation_as_forward_only_tokens(tmp_path, cache_dir):
    result = run_cli("sweep", "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy",
                     "settings=[instruct]", "include_start=false", "methods=[d2o]", "budget.pairs=8",
                     "+method_params.d2o.samples=2", "tasks=[heldout_preference]",
                     "+task_params.heldout_preference.limit=4", f"paths.results={tmp_path}", "name=d", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "d")
    consumed = record["consumed"]
    assert record["status"] == "ok" and consumed["optimizer_steps"] == 2 and consumed["pairs"] == 8
    assert consumed["samples_per_negative"] == 2 and consumed["generation_tokens"] > 0
    # forward-only = the reference's pass over the trained sequences (each negative and its 2 samples) + generation
    assert consumed["reference_tokens"] == consumed["reference_scored_tokens"] + consumed["generation_tokens"]
    assert consumed["reference_scored_tokens"] == consumed["policy_tokens"]


def test_sequence_logps_sum_each_completions_log_probs(tiny_model):
    """The own loop's scoring (only the scored positions through the LM head) against a plain log-softmax per sequence."""
    from transformers import AutoModelForCausalLM

    from harness.train.sequence_loop import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sequences = [([1, 5, 7, 9, 11], [3, 4, 5]), ([2, 3], [8, 9, 10, 11, 12]), ([4, 4, 4], [6])]
    sums, states = sequence_logps(model, sequences, pad_id=0, device="cpu", prompt_states=True)
    for (prompt, completion), value, state in zip(sequences, sums, states):
        output = model(torch.tensor([prompt + completion]), output_hidden_states=True)
        logps = torch.log_softmax(output.logits[0, :-1].float(), dim=-1)
        expected = sum(logps[len(prompt) - 1 + i, token] for i, token in enumerate(completion))
        assert value.item() == pytest.approx(expected.item(), abs=1e-4)
        assert torch.allclose(state, output.hidden_states[-1][0, len(prompt) - 1], atol=1e-5)
