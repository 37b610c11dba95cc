"""Records: round trip, atomic replacement, resume keys, leaderboard from records alone."""

from __future__ import annotations

import json

import pytest

from harness.errors import HarnessError
from harness.report.leaderboard import Board, build_leaderboard
from harness.identity import config_hash
from harness.records import append_record, finished_keys, latest_records, read_records


def record(run_id: str, method: str, status: str = "ok", value: float = 0.5, **extra) -> dict:
    return {"run_id": run_id, "task_key": "truthfulqa_mc-abc", "sweep": "s", "family": "f", "setting": "instruct",
            "method": method, "task": "truthfulqa_mc", "task_version": "1", "status": status, "reason": None,
            "metrics": {"mc1": {"value": value, "stderr": 0.01, "higher_is_better": True}} if status == "ok" else {},
            "consumed": {"optimizer_steps": 2, "flops": 1.5e12}, **extra}


def test_record_round_trip_and_replacement(tmp_path):
    append_record(tmp_path, record("r1", "start"))
    append_record(tmp_path, record("r2", "dpo", status="failed"))
    assert finished_keys(tmp_path) == {("r1", "truthfulqa_mc-abc")}
    append_record(tmp_path, record("r2", "dpo", value=0.75))  # the re-run replaces the failure
    records = read_records(tmp_path)
    assert [r["run_id"] for r in records] == ["r1", "r2"]
    assert records[1]["metrics"]["mc1"]["value"] == 0.75
    assert finished_keys(tmp_path) == {("r1", "truthfulqa_mc-abc"), ("r2", "truthfulqa_mc-abc")}
    assert not list(tmp_path.glob(".*.tmp"))


def test_latest_record_wins_when_files_are_merged():
    merged = [record("r1", "dpo", status="failed"), record("r1", "dpo", value=0.6)]
    assert latest_records(merged)[0]["status"] == "ok"


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_corrupt_record_line_is_named(tmp_path):
    (tmp_path / "records.jsonl").write_text(json.dumps(record("r1", "start")) + "\n{broken\n")
    with pytest.raises(HarnessError, match=r"records\.jsonl:2: not a JSON record"):
        read_records(tmp_path)


def test_leaderboard_from_records_alone(tmp_path):
    append_record(tmp_path, record("r2", "dpo", value=0.7))
    append_record(tmp_path, record("r1", "start", value=0.5))
    append_record(tmp_path, record("r3", "kto", status="skipped", reason="checkpoint not here; set model.checkpoints.x"))
    outputs = build_leaderboard(tmp_path)
    assert [key[2] for key in Board(tmp_path).keys] == ["start", "dpo", "kto"]  # the start leads its setting
    markdown = outputs["markdown"].read_text()
    assert "0.7000 ± 0.0100" in markdown and "skipped: checkpoint not here" in markdown
    assert outputs["csv"].read_text().splitlines()[0].startswith("family,setting,method")
    assert outputs["plot tasks"].stat().st_size > 1000


def test_leaderboard_on_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(HarnessError, match="holds no records"):
        build_leaderboard(tmp_path)
