"""The real ``align-harness`` entry point end to end on ``tiny-random`` (fast) and on the embedded
model (slow): training, scoring, records, resume. Bad input: ``test_bad_input.py``. Adding a method or a task in
two files, from a folder outside the repository: ``test_plugins.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli
from harness.inputs.cache import TEMPORARY
from harness.records import read_records

TINY = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
        "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4"]


def sweep_args(results: Path, *overrides: str) -> list[str]:
    return ["sweep", *TINY, f"paths.results={results}", "name=t", *overrides]


def ok_keys(folder: Path) -> list[tuple[str, str]]:
    return [(r["run_id"], r["task_key"]) for r in read_records(folder) if r["status"] == "ok"]


def test_tiny_sweep_end_to_end_with_a_derived_setting(tmp_path, cache_dir):
    result = run_cli(*sweep_args(tmp_path, "settings=[instruct,sft]", "methods=[dpo,kto]",
                                 "model.checkpoints.sft=derived:sft:instruct"), cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "t"
    assert f"leaderboard: {folder / 'leaderboard.md'}" in result.stdout
    records = read_records(folder)
    assert {(r["setting"], r["method"]) for r in records} == {
        (s, m) for s in ("instruct", "sft") for m in ("start", "dpo", "kto")}
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    for r in records:
        assert set(r["metrics"]) == {"mc1", "mc2"}
        assert 0 <= r["metrics"]["mc1"]["value"] <= 1 and r["metrics"]["mc1"]["stderr"] is not None
        assert r["versions"]["trl"] and r["versions"]["torch"] and r["chat_template"]["used"] is True
        assert (folder / r["samples_file"]).exists()
        assert r["started_at"] <= r["finished_at"]
    dpo = next(r for r in records if r["method"] == "dpo" and r["setting"] == "instruct")
    kto = next(r for r in records if r["method"] == "kto" and r["setting"] == "instruct")
    # matched budget: same optimizer steps over the same pairs; KTO sees each pair as two examples
    assert dpo["consumed"]["optimizer_steps"] == kto["consumed"]["optimizer_steps"] == 1
    assert dpo["consumed"]["pairs"] == kto["consumed"]["pairs"] == 4
    assert kto["consumed"]["examples"] == 2 * dpo["consumed"]["examples"]
    assert dpo["consumed"]["flops"] > 0 and dpo["consumed"]["peak_memory_mib"] > 0
    sft_start = next(r for r in records if r["method"] == "start" and r["setting"] == "sft")
    assert sft_start["run_config"]["start"]["derived"] == "sft"
    assert sft_start["consumed"]["optimizer_steps"] == 1  # the derived stage's own cost is on its row
    table = (folder / "leaderboard.md").read_text()
    assert "## tiny-random · instruct" in table and "## tiny-random · sft" in table and "truthfulqa_mc/mc1" in table
    # a row in each setting's main table and in the matrix; trained rows also in each setting's budget table (the
    # derived sft start row too: its SFT stage's cost is on its row)
    starts = lambda label: sum(line.startswith(f"| {label} |") for line in table.splitlines())
    assert starts("start") == 4 and starts("dpo") == starts("kto") == 5
    assert (folder / "leaderboard.csv").exists() and (folder / "plots" / "tasks.png").exists()

    again = run_cli(*sweep_args(tmp_path, "settings=[instruct,sft]", "methods=[dpo,kto]",
                                "model.checkpoints.sft=derived:sft:instruct"), cache=cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, skipped" in again.stdout + again.stderr
    assert len(read_records(folder)) == len(records)


def test_resume_after_a_killed_sweep_loses_and_duplicates_nothing(tmp_path, cache_dir):
    arguments = sweep_args(tmp_path, "settings=[instruct,pretrained]", "methods=[dpo,kto]")
    folder = tmp_path / "t"
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", *arguments], cwd=REPO, env=cli_env(cache_dir),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(read_records(folder)) < 2 and process.poll() is None:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {(r["run_id"], r["task_key"]): r["finished_at"] for r in read_records(folder)}
    assert 2 <= len(before) < 6, "the kill must land mid-sweep"

    result = run_cli(*arguments, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(folder)
    keys = [(r["run_id"], r["task_key"]) for r in records]
    assert len(keys) == len(set(keys)) == 6  # 2 settings × (start, dpo, kto) × 1 task
    assert all(r["status"] == "ok" for r in records)
    for key, finished in before.items():  # finished work was not redone
        assert next(r for r in records if (r["run_id"], r["task_key"]) == key)["finished_at"] == finished
    leftovers = [name for root in (tmp_path, cache_dir) for _, dirs, files in os.walk(root)  # links not followed
                 for name in dirs + files if TEMPORARY.match(name)]
    assert not leftovers  # the rerun removed the killed writer's temporaries (kills at chosen points: test_cache_integrity)


def test_hub_checkpoint_offline_is_a_skipped_record_naming_the_key(tmp_path, cache_dir):
    result = run_cli(*sweep_args(tmp_path, "settings=[pretrained]", "methods=[dpo]",
                                 "model.checkpoints.pretrained=HuggingFaceTB/SmolLM2-135M"), cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(tmp_path / "t")
    assert {r["status"] for r in records} == {"skipped"} and len(records) == 2
    assert all("set model.checkpoints.pretrained=" in r["reason"] for r in records)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, cache_dir):
    result = run_cli(*sweep_args(tmp_path, "settings=[instruct]", "methods=[dpo,kto]",
                                 "+method_params.dpo.loss_type=no_such_loss"), cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    by_method = {r["method"]: r for r in read_records(tmp_path / "t")}
    assert by_method["dpo"]["status"] == "failed" and "logs/" in by_method["dpo"]["reason"]
    assert by_method["kto"]["status"] == "ok" and by_method["start"]["status"] == "ok"
    assert "failed" in (tmp_path / "t" / "leaderboard.md").read_text()


def test_method_and_task_shorthands(tmp_path, cache_dir):
    """``method=dpo task=truthfulqa_mc`` (not Hydra config-group choices) train and score just those."""
    args = [a for a in sweep_args(tmp_path, "settings=[instruct]", "include_start=false", "method=dpo",
                                  "task=truthfulqa_mc") if a != "tasks=[truthfulqa_mc]"]
    result = run_cli(*args, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {(r["method"], r["task"], r["status"]) for r in read_records(tmp_path / "t")} == {("dpo", "truthfulqa_mc", "ok")}


@pytest.mark.slow
def test_embedded_model_micro_sweep(tmp_path, cache_dir):
    """The shipped default family (SmolLM2-135M-Instruct from PyPI) through the real CLI, shrunk."""
    result = run_cli("sweep", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
                     "settings=[instruct,sft]", "methods=[dpo,kto]",
                     "+task_params.truthfulqa_mc.limit=2",
                     f"paths.results={tmp_path}", "name=e", cache=cache_dir, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(tmp_path / "e")
    assert {(r["setting"], r["method"]) for r in records} == {
        (s, m) for s in ("instruct", "sft") for m in ("start", "dpo", "kto")}
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    start = next(r for r in records if r["setting"] == "instruct" and r["method"] == "start")
    assert start["run_config"]["start"]["spec"] == "embedded:smollm2-135m-instruct"
    dpo = next(r for r in records if r["setting"] == "instruct" and r["method"] == "dpo")
    assert dpo["consumed"]["parameters"] > 100_000_000
