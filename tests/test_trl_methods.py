"""The offline preference-optimization methods TRL 1.16 implements, each as a ``conf/method`` file:
their configs resolve to TRL configs TRL accepts, one real sweep trains them all under one matched
budget, and the adapters of their own (SLiC, CPO, SimPO, ORPO) move every trainable parameter."""

from __future__ import annotations

import dataclasses
import inspect
import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import REPO, assert_same_loss_and_gradients, one_micro_batch_step, run_cli
from harness.run import registry
from harness.train.budget import Budget
from harness.protocols import TrainingJob
from harness.records import read_records
from harness.train.plan import plan_training
from harness.train.trl_support import trl_arguments
from methods.cdpo import conservative_dpo_loss, robust_label_smoothing_for
from methods.kto import kto_class_weights

# conf/method name → the TRL DPOTrainer loss_type it must select
DPO_ALIASES = {"ipo": "ipo", "exo": "exo_pair", "nca": "nca_pair", "bco": "bco_pair", "aot": "aot",
               "apo": "apo_zero", "sppo_hard": "sppo_hard", "discopop": "discopop", "cdpo": "robust"}
OWN_ADAPTERS = ["slic", "cpo", "simpo", "orpo"]
NEW_METHODS = [*DPO_ALIASES, *OWN_ADAPTERS]
REFERENCE_FREE = {"cpo", "simpo", "orpo"}


def micro_budget(**changes) -> Budget:
    return dataclasses.replace(Budget.from_config(OmegaConf.load(REPO / "conf" / "budget" / "micro.yaml")), **changes)


def make_job(tmp_path, start, rows=(), budget=None, method=SimpleNamespace(data_view="pairs")) -> TrainingJob:
    """A job on ``rows`` under ``budget`` (``budget=micro``), planned as the sweep plans it (no rows: no tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start) if rows else None
    plan = plan_training(budget or micro_budget(), method, list(rows), [], tokenizer)
    return TrainingJob(start_checkpoint=start, output_dir=tmp_path / "out", plan=plan, seed=0,
                       scratch_dir=tmp_path / "scratch")


def trl_dpo_loss_types() -> set[str]:
    """The loss_type names DPOTrainer's loss actually dispatches on (read from TRL's source, not its docs)."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    return {name for name in {*DPO_ALIASES.values(), "sigmoid", "hinge", "sft"} if f'loss_type == "{name}"' in source}


# (a) every new config instantiates and maps onto a TRL config TRL accepts ---------------------------------------

@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_config_instantiates_and_names_its_source(name):
    method = registry.instantiate("method", name, None, params_key="method_params")
    assert method.name == name
    assert method.data_view == "pairs"
    assert method.reference_based is (name not in REFERENCE_FREE)
    text = (REPO / "conf" / "method" / f"{name}.yaml").read_text()
    assert text.startswith(f"# Used by: align-harness sweep methods=[{name}]")
    assert "arXiv:" in text or "ericmitchell.ai" in text or "Mitchell 2023" in text


@pytest.mark.parametrize("name", DPO_ALIASES)
def test_dpo_alias_selects_a_loss_trl_implements(tmp_path, name):
    from trl import DPOConfig

    method = registry.instantiate("method", name, None, params_key="method_params")
    dpo = method.dpo if name == "cdpo" else method  # cDPO wraps methods.dpo.DPO (see methods/cdpo.py)
    assert dpo.loss_type == DPO_ALIASES[name]
    assert dpo.loss_type in trl_dpo_loss_types(), f"TRL's DPOTrainer no longer implements {dpo.loss_type!r}"
    arguments = trl_arguments(make_job(tmp_path, tmp_path), learning_rate=dpo.learning_rate)
    config = DPOConfig(**arguments, beta=dpo.beta, loss_type=[dpo.loss_type], label_smoothing=dpo.label_smoothing)
    assert config.loss_type == [DPO_ALIASES[name]]
    if name == "exo":
        assert config.label_smoothing > 0  # DPOTrainer rejects exo_pair without it


def test_slic_maps_margin_and_weight_onto_trl(tmp_path):
    from trl import DPOConfig

    method = registry.instantiate("method", "slic", {"margin": 2.0, "sft_weight": 0.25}, params_key="method_params")
    arguments = trl_arguments(make_job(tmp_path, tmp_path), learning_rate=method.learning_rate)
    config = DPOConfig(**arguments, **method.trl_options())
    assert config.loss_type == ["hinge", "sft"] and config.loss_weights == [1.0, 0.25]
    assert config.beta == pytest.approx(0.5)  # TRL's hinge relu(1 − βΔ) has margin 1/β
    assert {"hinge", "sft"} <= trl_dpo_loss_types()


@pytest.mark.parametrize("name, config_class", [("cpo", "CPOConfig"), ("simpo", "CPOConfig"), ("orpo", "ORPOConfig")])
def test_experimental_adapters_build_their_trl_config_from_the_budget(tmp_path, name, config_class):
    method = registry.instantiate("method", name, None, params_key="method_params")
    budget = micro_budget()
    config = method.trl_config(make_job(tmp_path, tmp_path, budget=budget))
    assert type(config).__name__ == config_class
    assert config.learning_rate == method.learning_rate and config.beta == method.beta
    assert config.per_device_train_batch_size == budget.micro_batch_pairs
    assert config.gradient_accumulation_steps == budget.batch_pairs // budget.micro_batch_pairs
    assert config.max_length >= budget.max_prompt_tokens + budget.max_completion_tokens
    if name == "simpo":
        assert config.loss_type == "simpo" and config.cpo_alpha == 0.0
        assert config.simpo_gamma == pytest.approx(method.beta * method.gamma_beta_ratio)  # TRL's γ, not γ/β
    if name == "cpo":
        assert config.loss_type == "sigmoid" and config.cpo_alpha == 1.0


# cDPO through TRL's robust loss ----------------------------------------------------------------------------------

def trl_robust_loss(margin: float, label_smoothing: float) -> float:
    """TRL 1.16 DPOTrainer._compute_loss, loss_type "robust", at margin = β·Δ (transcribed)."""
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    clean = -(1 - label_smoothing) * log_sigmoid(margin)
    flipped = -label_smoothing * log_sigmoid(-margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def test_conservative_dpo_loss_on_hand_computed_values():
    assert conservative_dpo_loss(0.0, 0.3) == pytest.approx(math.log(2))     # no margin: log 2 whatever ε
    assert conservative_dpo_loss(2.0, 0.0) == pytest.approx(0.126928, abs=1e-6)  # DPO: log(1 + e^−2)
    assert conservative_dpo_loss(2.0, 0.1) == pytest.approx(0.9 * 0.126928 + 0.1 * 2.126928, abs=1e-6)


@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.1, 0.25, 0.4])
@pytest.mark.parametrize("margin", [-3.0, -0.5, 0.0, 0.7, 4.0])
def test_trl_robust_loss_at_the_mapped_smoothing_is_cdpo(epsilon, margin):
    assert trl_robust_loss(margin, robust_label_smoothing_for(epsilon)) == pytest.approx(
        conservative_dpo_loss(margin, epsilon), rel=1e-12, abs=1e-12)


def test_cdpo_rejects_label_noise_outside_its_range():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        robust_label_smoothing_for(0.5)


# KTO class weights -----------------------------------------------------------------------------------------------

def test_kto_class_weights_follow_the_paper():
    assert kto_class_weights(500, 500) == (1.0, 1.0)
    desirable, undesirable = kto_class_weights(10, 100)  # the paper's 1:10 example: λ_U = 1, λ_D ∈ [10, 13.33]
    assert (desirable, undesirable) == (pytest.approx(10.0), 1.0)
    assert kto_class_weights(10, 100, ratio=4 / 3)[0] == pytest.approx(13.333, abs=1e-3)
    assert kto_class_weights(100, 10) == (pytest.approx(0.1), 1.0)
    for n_d, n_u in [(10, 100), (100, 10), (7, 3)]:
        d, u = kto_class_weights(n_d, n_u, ratio=1.2)
        assert d * n_d / (u * n_u) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        kto_class_weights(0, 5)
    with pytest.raises(ValueError):
        kto_class_weights(5, 5, ratio=2.0)


# (b) all of them through the real CLI under one matched budget -------------------------------------------------

def test_all_new_methods_train_in_one_matched_sweep(tmp_path, cache_dir):
    result = run_cli("sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]",
                     f"methods=[{','.join(NEW_METHODS)}]", "include_start=false", "tasks=[truthfulqa_mc]",
                     "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4", f"paths.results={tmp_path}", "name=t", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(tmp_path / "t")
    by_method = {r["method"]: r for r in records}
    assert sorted(by_method) == sorted(NEW_METHODS) and len(records) == len(NEW_METHODS)
    assert all(r["status"] == "ok" for r in records), {r["method"]: r["reason"] for r in records if r["status"] != "ok"}
    steps = {name: r["consumed"]["optimizer_steps"] for name, r in by_method.items()}
    assert set(steps.values()) == {1}, steps  # matched: the same optimizer steps (budget=micro: 4 pairs, one batch)
    assert {r["consumed"]["pairs"] for r in records} == {micro_budget().pairs}
    for name, record in by_method.items():
        consumed = record["consumed"]
        assert consumed["policy_tokens"] > 0 and consumed["flops"] > 0
        if name in REFERENCE_FREE:
            assert consumed["reference_tokens"] == 0 and "reference_cache" not in consumed, (name, consumed)
        else:  # scored once, or read from the shared reference cache filled by an earlier method of the sweep
            assert consumed["reference_tokens"] > 0 or consumed.get("reference_cache") == "hit", (name, consumed)


# (c) the adapters of our own move every trainable parameter ----------------------------------------------------

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
          "chosen": f"It is {2 * i}.", "rejected": f"No idea, perhaps {i}{i}{i}."} for i in range(8)]


@pytest.mark.parametrize("name", OWN_ADAPTERS)
def test_training_changes_every_trainable_parameter(tmp_path, tiny_model, name):
    import torch
    from transformers import AutoModelForCausalLM

    method = registry.instantiate("method", name, {"learning_rate": 1e-2}, params_key="method_params")
    budget = micro_budget(pairs=len(PAIRS), batch_pairs=2, micro_batch_pairs=2)  # 4 optimizer steps
    outcome = method.train(make_job(tmp_path, tiny_model, PAIRS, budget, method))
    assert outcome.optimizer_steps == 4 and outcome.pairs == len(PAIRS)
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert before.keys() == after.keys()
    unchanged = [key for key, value in before.items() if value.requires_grad and torch.equal(value, after[key])]
    assert not unchanged, f"{name}: parameters left unchanged by training: {unchanged}"


# CPO and SimPO: the compact LM head ------------------------------------------------------------------------------

def test_kept_positions_start_at_the_batchs_earliest_scored_label():
    import torch

    from harness.train.trl_extensions import kept_positions

    labels = torch.tensor([[-100, -100, -100, 5, 6, -100],    # first scored label at 3: logits from position 2
                           [-100, -100, -100, -100, 7, 8]])
    assert kept_positions(labels) == 4  # positions 2..5
    assert kept_positions(torch.full((2, 4), -100)) == 0
    assert kept_positions(torch.tensor([[1, 2, 3]])) == 3  # every label scored: position 0 predicts label 1


@pytest.mark.parametrize("name", ["cpo", "simpo"])
def test_cpo_compact_lm_head_gives_trls_loss_and_gradients(tmp_path, tiny_model, name):
    """The CPO trainer's forward asks only for the scored positions' logits (``cpo_trainer_class``): on one
    micro-batch in fp32 the loss (preference term and, for CPO, the NLL term) and every gradient equal
    TRL's own forward's up to float rounding, and the logits it computed cover fewer positions."""
    import torch

    from harness.train.trl_extensions import kept_positions

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}: " + "tell me more, " * (3 + i % 4)}],
             "chosen": f"Answer {i}, gladly.", "rejected": f"No {i}."} for i in range(8)]  # prompts of many lengths
    method = registry.instantiate("method", name, None, params_key="method_params")
    job = make_job(tmp_path, tiny_model, rows, budget=micro_budget(pairs=8, batch_pairs=4, micro_batch_pairs=4))
    results = []
    for compact in (False, True):
        trainer = method.trainer(job)
        trainer.compact_lm_head = compact
        step = one_micro_batch_step(trainer)
        with torch.no_grad():
            chosen_logps, rejected_logps, chosen_logits, _, nll = trainer.concatenated_forward(trainer.model, step[0])
        results.append((step, (chosen_logps, rejected_logps, nll), chosen_logits.shape[1]))
    (slow_step, slow_terms, slow_positions), (fast_step, fast_terms, fast_positions) = results
    concatenated = trainer.concatenated_inputs(fast_step[0], is_encoder_decoder=False,
                                               padding_value=trainer.pad_token_id, device=trainer.accelerator.device)
    assert fast_positions == kept_positions(concatenated["concatenated_labels"]) < slow_positions
    for slow, fast in zip(slow_terms, fast_terms):  # the log-probs of both sides and the NLL term
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert_same_loss_and_gradients(slow_step, fast_step)


def test_sft_fast_scoring_gives_trls_loss_and_gradients(tmp_path, tiny_model):
    """``HarnessSFTTrainer`` scores through the compact LM head and whole logits (harness.train.trl_extensions): on one
    micro-batch in fp32 the SFT loss and every gradient equal TRL's own path's up to float rounding."""
    from harness.train.trl_extensions import HarnessSFTTrainer

    method = registry.instantiate("method", "sft", None, params_key="method_params")
    job = make_job(tmp_path, tiny_model, PAIRS, micro_budget(pairs=8, batch_pairs=4, micro_batch_pairs=4), method)
    results = []
    for fast in (False, True):
        trainer = method.trainer(job)
        assert isinstance(trainer, HarnessSFTTrainer)
        trainer.compact_lm_head = trainer.whole_logit_scoring = fast
        results.append(one_micro_batch_step(trainer))
        assert (results[-1][0]["labels"] == -100).any()  # prompt positions are not scored: the compact head skips them
    assert_same_loss_and_gradients(*results)
