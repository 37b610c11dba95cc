"""Matched budgets (examples / tokens / FLOPs), equal tuning effort, and that every method learns
a learnable toy preference set through the real CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from harness.train.budget import Budget
from harness.train.matching import matched_visits
from harness.records import read_records
from harness.run.registry import available, instantiate

TOY = ["model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]"]


def budget(**changes) -> Budget:
    values = dict(name="b", pairs=4, epochs=1, max_prompt_tokens=8, max_completion_tokens=8, batch_pairs=1,
                  micro_batch_pairs=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="fp32")
    values.update(changes)
    return Budget(**values)


DPO_LIKE = SimpleNamespace(data_view="pairs", reference_based=True)
SIMPO_LIKE = SimpleNamespace(data_view="pairs", reference_based=False)
KTO_LIKE = SimpleNamespace(data_view="unpaired", reference_based=True, forward_only_ratio=3.0)
SFT_LIKE = SimpleNamespace(data_view="sft", reference_based=False)


def test_matched_visits_by_hand():
    lengths = [(10, 5, 5)] * 4  # every pair: prompt 10, chosen 5, rejected 5 tokens
    # examples: the budget's pairs, whatever the method
    assert matched_visits(budget(match="examples"), SIMPO_LIKE, lengths) == 4
    # tokens: a pair visit trains 2·10+5+5 = 30 tokens for pair and unpaired views, 15 for SFT
    assert matched_visits(budget(match="tokens"), KTO_LIKE, lengths) == 4
    assert matched_visits(budget(match="tokens"), SFT_LIKE, lengths) == 8
    # flops: target = 4 visits × (6 + 2·1)·30 = 960 (N cancels); SimPO pays 6·30 = 180 a visit → 960/180 = 5.33 → 5;
    # KTO pays (6 + 2·3)·30 = 360 a visit → 2.67 → 3
    assert matched_visits(budget(match="flops"), DPO_LIKE, lengths) == 4
    assert matched_visits(budget(match="flops"), SIMPO_LIKE, lengths) == 5
    assert matched_visits(budget(match="flops"), KTO_LIKE, lengths) == 3


def matched_methods() -> list[str]:
    return [m for m in ("dpo", "simpo", "kto") if m in available("method")]


@pytest.mark.parametrize("mode, key", [("flops", "flops"), ("tokens", "policy_tokens")])
def test_flops_and_tokens_matching_agree_within_5_percent(tmp_path, cache_dir, mode, key):
    methods = matched_methods()
    result = run_cli("sweep", *TOY, f"methods=[{','.join(methods)}]", "include_start=false", "tasks=[heldout_preference]",
                     "+task_params.heldout_preference.limit=4", "budget.pairs=24", "budget.batch_pairs=2",
                     "budget.micro_batch_pairs=2", f"budget.match={mode}", f"paths.results={tmp_path}", "name=m",
                     cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    consumed = {r["method"]: r["consumed"] for r in read_records(tmp_path / "m")}
    assert set(consumed) == set(methods)
    values = [c[key] for c in consumed.values()]
    assert max(values) <= 1.05 * min(values), consumed
    assert all(c["match"] == mode for c in consumed.values())
    if mode == "flops":  # the reference-based KTO pays more per pair, so it takes fewer steps than DPO
        assert consumed["kto"]["optimizer_steps"] < consumed["dpo"]["optimizer_steps"]
        if "simpo" in consumed:
            assert consumed["simpo"]["optimizer_steps"] > consumed["dpo"]["optimizer_steps"]


def test_tune_gives_every_method_the_same_trials_and_records_them(tmp_path, cache_dir):
    result = run_cli("sweep", *TOY, "methods=[dpo,kto]", "include_start=false", "tasks=[heldout_preference]",
                     "+task_params.heldout_preference.limit=4", "budget.pairs=8", "tune.trials=2",
                     "tune.heldout_pairs=8", f"paths.results={tmp_path}", "name=t", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for record in read_records(tmp_path / "t"):
        tuning = record["tuning"]
        assert len(tuning["trials"]) == 2 and all(t["status"] == "ok" for t in tuning["trials"])
        best = max(tuning["trials"], key=lambda t: t["accuracy"])
        assert tuning["chosen"] == best["params"]
        for name, value in tuning["chosen"].items():
            assert record["run_config"]["hyperparameters"][name] == value
        assert record["run_id"] == best["run_id"]
    assert [t["params"] for t in read_records(tmp_path / "t")[0]["tuning"]["trials"]] == \
           [t["params"] for t in read_records(tmp_path / "t")[1]["tuning"]["trials"]]


def test_tune_with_more_trials_than_the_grid_is_refused(tmp_path, cache_dir):
    result = run_cli("sweep", *TOY, "methods=[sft]", "tune.trials=5", "tune.heldout_pairs=4",
                     "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4", f"paths.results={tmp_path}", "name=t",
                     cache=cache_dir)
    assert result.returncode == 2
    assert "tune_grid has 3 combinations but tune.trials=5" in result.stderr


def learning_rate_overrides(methods: list[str]) -> list[str]:
    return [f"+method_params.{m}.learning_rate=1e-3" for m in methods]


# DiscoPOP's discovered loss (Chris Lu et al. 2024) has a positive slope at zero margin: from the
# reference it first descends to a local minimum at a *negative* margin (≈ −2.4 at β = τ = 0.05), so on
# the toy set its loss falls and every parameter moves, but held-out accuracy falls too. That is the
# loss, not the harness; the accuracy check is waived for it alone.
ACCURACY_WAIVED = {"discopop"}
# Methods that train LoRA adapters on the linear layers by design (PAFT merges two): embeddings and norms stay
ADAPTER_METHODS = {"paft"}


def offline_methods() -> list[str]:
    """Every method in conf/method that learns from the preference data itself: no reward, and not one that
    samples its own responses (``prompts_only``: self_rewarding needs no reward but learns from its own samples;
    the online methods are tested in test_rewards_and_online.py and test_self_play.py)."""
    methods = [(m, instantiate("method", m, None, params_key="method_params")) for m in available("method")]
    return [m for m, method in methods
            if not getattr(method, "needs_reward", False) and not getattr(method, "prompts_only", False)]


def test_every_method_learns_the_toy_preference(tmp_path, cache_dir):
    """For every offline method in conf/method: the training loss falls, every trainable parameter changes,
    and held-out preference accuracy rises above the untrained model's."""
    methods = offline_methods()
    result = run_cli("sweep", *TOY, f"methods=[{','.join(methods)}]", *learning_rate_overrides(methods),
                     "tasks=[heldout_preference]", f"paths.results={tmp_path}", "name=l", cache=cache_dir, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "l")}
    failed = {m: r["reason"] for m, r in records.items() if r["status"] != "ok"}
    assert not failed, failed
    start = records["start"]
    start_weights = load_file(next((cache_dir / "models" / "tiny-random-3").glob("*.safetensors")))
    start_avg = start["metrics"]["avg_logp_accuracy"]["value"]
    problems = []
    for method in methods:
        record = records[method]
        curves = [json.loads(line) for line in (tmp_path / "l" / "curves" / f"{record['run_id']}.jsonl").read_text().splitlines()]
        losses = [c["loss"] for c in curves if "loss" in c]
        if not losses[-1] < losses[0]:
            problems.append(f"{method}: loss did not fall {losses}")
        trained = load_file(next((cache_dir / "checkpoints" / record["run_id"]).glob("*.safetensors")))
        unchanged = [name for name, tensor in start_weights.items() if torch.equal(tensor, trained[name])
                     and not (method in ADAPTER_METHODS and (tensor.dim() < 2 or name.endswith("embed_tokens.weight")))]
        if unchanged:
            problems.append(f"{method}: parameters unchanged {unchanged[:3]}")
        metrics = record["metrics"]
        rose = metrics["logratio_accuracy"]["value"] > 0.5 or metrics["avg_logp_accuracy"]["value"] > start_avg
        if not rose and method not in ACCURACY_WAIVED:
            problems.append(f"{method}: held-out accuracy did not rise {metrics} (start avg_logp {start_avg})")
    assert not problems, "\n".join(problems)
