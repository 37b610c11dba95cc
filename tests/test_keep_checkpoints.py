"""keep_checkpoints=false: a trained checkpoint leaves the cache once every task has its ok record; the records stay,
a second run does nothing again, and a task added later retrains the run."""

from __future__ import annotations

from conftest import cache_entries, run_cli
from harness.records import read_records

SWEEP = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]", "methods=[dpo]",
         "tasks=[heldout_preference]", "keep_checkpoints=false"]


def test_dropped_checkpoints_keep_their_records_and_a_new_task_retrains(tmp_path, own_cache):
    first = run_cli("sweep", *SWEEP, f"paths.results={tmp_path}", "name=k", cache=own_cache)
    assert first.returncode == 0, first.stderr
    records = read_records(tmp_path / "k")
    trained = [r for r in records if r["method"] == "dpo"]
    assert [r["status"] for r in records] == ["ok", "ok"] and len(trained) == 1
    assert not (own_cache / "checkpoints" / trained[0]["run_id"]).exists()
    assert "dropped (keep_checkpoints=false)" in first.stderr + first.stdout
    assert [p.name for p in cache_entries(own_cache / "checkpoints")] == []

    again = run_cli("sweep", *SWEEP, f"paths.results={tmp_path}", "name=k", cache=own_cache)
    assert again.returncode == 0 and "done before, skipped" in again.stderr + again.stdout
    assert len(read_records(tmp_path / "k")) == 2   # nothing trained or scored again

    more = run_cli("sweep", *SWEEP, "tasks=[heldout_preference,truthfulqa_mc]", f"paths.results={tmp_path}", "name=k",
                   cache=own_cache)
    assert more.returncode == 0, more.stderr
    added = [r for r in read_records(tmp_path / "k") if r["task"] == "truthfulqa_mc"]
    assert {r["method"]: r["status"] for r in added} == {"start": "ok", "dpo": "ok"}
    assert not (own_cache / "checkpoints" / trained[0]["run_id"]).exists()  # retrained, scored, dropped again


def test_keep_checkpoints_must_be_a_boolean(tmp_path, cache_dir):
    result = run_cli("sweep", *SWEEP[:-1], "keep_checkpoints=sometimes", f"paths.results={tmp_path}", cache=cache_dir)
    assert result.returncode == 2 and "keep_checkpoints" in result.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())
