"""eval_precision=bf16 (harness.evaluate.engines.scoring_precision): tasks are scored under bf16 autocast, the
records say so in their score key, the numbers stay close to fp32's, and fp32 and bf16 pair log-probs never share a
cache entry."""

from __future__ import annotations

from conftest import run_cli
from harness.records import read_records


def test_bf16_scoring_is_its_own_measurement_close_to_fp32(tmp_path, cache_dir):
    common = ["sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]",
              "methods=[]", "tasks=[heldout_preference,truthfulqa_mc]", "+task_params.heldout_preference.limit=8",
              "+task_params.truthfulqa_mc.limit=2", f"paths.results={tmp_path}", "name=t"]
    fp32 = run_cli(*common, cache=cache_dir)
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    bf16 = run_cli(*common, "eval_precision=bf16", cache=cache_dir)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert "done before" not in bf16.stdout + bf16.stderr  # a new measurement: scored again
    records = read_records(tmp_path / "t")
    by = {}
    for record in records:
        by[(record["task"], record["measurement"]["evaluation"].get("precision", "fp32"))] = record
    assert set(by) == {(t, p) for t in ("heldout_preference", "truthfulqa_mc") for p in ("fp32", "bf16")}
    for task in ("heldout_preference", "truthfulqa_mc"):
        assert by[(task, "fp32")]["measurement_key"] != by[(task, "bf16")]["measurement_key"]
    # the same items scored in another precision: the per-pair log-probs differ (cache kept apart), the metric is near
    assert (cache_dir / "tasks-bf16" / "pair_logps").is_dir() and (cache_dir / "tasks" / "pair_logps").is_dir()
    fp32_files = {p.name for p in (cache_dir / "tasks" / "pair_logps").glob("*.json")}
    bf16_files = {p.name for p in (cache_dir / "tasks-bf16" / "pair_logps").glob("*.json")}
    assert bf16_files and bf16_files <= fp32_files  # same model and pairs: the same entry name ...
    name = sorted(bf16_files)[0]
    a = (cache_dir / "tasks" / "pair_logps" / name).read_text()
    b = (cache_dir / "tasks-bf16" / "pair_logps" / name).read_text()
    assert a != b  # ... other numbers
    for task, metric in (("heldout_preference", "avg_logp_accuracy"), ("truthfulqa_mc", "mc2")):
        assert abs(by[(task, "fp32")]["metrics"][metric]["value"] - by[(task, "bf16")]["metrics"][metric]["value"]) <= 0.5
