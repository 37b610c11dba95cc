"""Verified cache entries and stale temporaries (harness/inputs/cache.py), and "kill a sweep anywhere, rerun it".

Unit tests of the manifest and checked files, then the real CLI on ``model=tiny-random budget=micro``: a damaged
checkpoint or log-prob cache is rebuilt with the same numbers; a dead writer's temporaries are removed and a live
one's kept; a sweep SIGKILLed inside a model save, a checkpoint write, record writes, a curve write and the
leaderboard write (``debug.kill_at``) ends, once rerun, with exactly an uninterrupted run's records and no temporary
left. Each sweep here gets its own cache (only the unpacked embedded model is shared, through a link)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cache_entries, run_cli
from harness import debug
from harness.errors import HarnessError
from harness.inputs import cache
from harness.inputs.cache import (MANIFEST, TEMPORARY, ensure_file, entry_damage, is_whole, publish, read_checked,
                                  read_checked_json, remove_stale_temporaries, write_checked, write_checked_json,
                                  write_manifest)
from harness.records import read_records

SWEEP = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]", "methods=[dpo,kto]",
         "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=8", "eval_batch_size=4", "name=k"]


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not cache.pid_alive(process.pid)
    return process.pid


def temporaries(*roots: Path) -> list[Path]:
    """Every ``.<name>.<pid>.tmp`` below the roots (links not followed: the shared embedded model is not ours)."""
    return [Path(folder) / name for root in roots for folder, dirs, files in os.walk(root)
            for name in dirs + files if TEMPORARY.match(name)]


def metrics(folder: Path) -> dict:
    return {(r["run_id"], r["task_key"]): r["metrics"] for r in read_records(folder)}


# unit: folder entries ------------------------------------------------------------------------------------------
def entry(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    write_manifest(folder)
    return folder


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = entry(tmp_path / "e")
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(files) == ["model.safetensors", "sub/config.json"]
    assert files["model.safetensors"]["size"] == 10240 and len(files["model.safetensors"]["sha256"]) == 64
    assert entry_damage(folder) is None


def test_manifest_catches_truncated_changed_missing_and_extra_files(tmp_path):
    folder = entry(tmp_path / "e")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100])
    assert entry_damage(folder) == "model.safetensors: 100 bytes, the manifest says 10240"
    changed = bytearray(original)
    changed[5000] ^= 1
    weights.write_bytes(bytes(changed))
    assert entry_damage(folder) == "model.safetensors: SHA-256 differs from the manifest"
    stat = weights.stat()
    weights.write_bytes(original)
    assert entry_damage(folder) is None
    cache._whole.clear()  # a new process: same size and time stamp, other bytes → hashed, caught
    weights.write_bytes(bytes(changed))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert entry_damage(folder) == "model.safetensors: SHA-256 differs from the manifest"
    weights.write_bytes(original)
    (folder / "sub" / "config.json").unlink()
    assert entry_damage(folder) == "sub/config.json: missing"
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    (folder / "pytorch_model.bin").write_bytes(b"x")
    assert entry_damage(folder) == "pytorch_model.bin: not in the manifest"
    (folder / "pytorch_model.bin").unlink()
    (folder / MANIFEST).write_text("{trunc")
    assert entry_damage(folder) == f"{MANIFEST} unreadable"
    (folder / MANIFEST).unlink()
    assert entry_damage(folder) == f"no {MANIFEST}"  # a folder from before manifests, or one cut short


def test_is_whole_logs_one_damaged_line(tmp_path, caplog):
    folder = entry(tmp_path / "e")
    assert not is_whole(tmp_path / "absent", "model")
    (folder / "model.safetensors").write_bytes(b"short")
    with caplog.at_level(logging.INFO, logger="harness"):
        assert not is_whole(folder, "checkpoint")
    assert caplog.messages == [f"cache: checkpoint {folder} damaged (model.safetensors: 5 bytes, "
                               f"the manifest says 10240); rebuilding"]


def test_publish_replaces_a_damaged_entry_and_keeps_a_whole_one(tmp_path):
    target = entry(tmp_path / "target")
    (target / "model.safetensors").write_bytes(b"short")  # damaged
    staging = tmp_path / ".target.1.tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"new")
    assert publish(staging, target) == target
    assert (target / "model.safetensors").read_bytes() == b"new" and entry_damage(target) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # the damaged one is gone, no temporary left
    other = tmp_path / ".target.2.tmp"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"other")
    publish(other, target)  # another process published a whole entry first: it stands
    assert (target / "model.safetensors").read_bytes() == b"new" and not other.exists()


# unit: checked files, data files -------------------------------------------------------------------------------
def test_checked_file_round_trip_and_damage(tmp_path, caplog):
    path = tmp_path / "pair_logps" / "k.json"
    write_checked_json(path, [{"chosen_logp": -1.25, "rejected_logp": 0.1 + 0.2}])
    assert read_checked_json(path, "pair log-probs") == [{"chosen_logp": -1.25, "rejected_logp": 0.1 + 0.2}]
    assert path.read_bytes().startswith(b"harness-cache sha256=")
    raw = path.read_bytes()
    payload = len(raw) - raw.index(b"\n") - 1
    with caplog.at_level(logging.INFO, logger="harness"):
        path.write_bytes(raw.replace(b"-1.25", b"-1.35"))
        assert read_checked_json(path, "pair log-probs") is None and not path.exists()  # deleted: rebuilt by the caller
        path.write_bytes(raw[:-3])
        assert read_checked(path, "pair log-probs") is None
        path.write_text('[{"chosen_logp": -1.25}]')  # a file from before checksums
        assert read_checked(path, "pair log-probs") is None
    assert caplog.messages == [f"cache: pair log-probs {path} damaged ({why}); rebuilding" for why in (
        "SHA-256 differs from the header", f"{payload - 3} bytes, the header says {payload}", "no checksum header")]
    write_checked(path, b"\x00binary\n")
    assert read_checked(path, "x") == b"\x00binary\n"
    assert not temporaries(tmp_path)


def test_converted_data_file_is_rewritten_when_its_content_differs(tmp_path, caplog):
    path = tmp_path / "truthfulqa-mc-n2-abc.jsonl"
    ensure_file(path, b'{"q": 1}\n', "converted data file")
    path.write_bytes(b'{"q": 1')
    with caplog.at_level(logging.INFO, logger="harness"):
        ensure_file(path, b'{"q": 1}\n', "converted data file")
    assert path.read_bytes() == b'{"q": 1}\n' and "damaged" in caplog.text


# unit: stale temporaries, the kill hook ------------------------------------------------------------------------
def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, caplog):
    dead, live = dead_pid(), os.getpid()
    stale_folder = tmp_path / "checkpoints" / f".abc.{dead}.tmp"
    stale_folder.mkdir(parents=True)
    (stale_folder / "model.safetensors").write_bytes(b"x" * 2500)
    stale_file = tmp_path / f".records.jsonl.{dead}.tmp"
    stale_file.write_bytes(b"y" * 10)
    kept = [tmp_path / f".records.jsonl.{live}.tmp", tmp_path / ".records.lock", tmp_path / "plain.tmp"]
    for path in kept:
        path.write_text("z")
    with caplog.at_level(logging.INFO, logger="harness"):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_folder, stale_file])
    assert not stale_folder.exists() and not stale_file.exists() and all(path.exists() for path in kept)
    assert f"removed stale temporary {stale_folder} (2.5 KB; its writer, pid {dead}, is gone)" in caplog.messages
    assert f"removed stale temporary {stale_file} (10 bytes; its writer, pid {dead}, is gone)" in caplog.messages


@pytest.mark.parametrize("spec", ["record_write", "record_write:0", "nowhere:1", "record_write:x"])
def test_kill_at_refuses_what_it_cannot_read(spec):
    with pytest.raises(HarnessError, match="debug.kill_at=.*write <point>:<n>"):
        debug.arm(spec)
    debug.arm(None)
    debug.reached("record_write")  # disarmed: nothing happens


# the real CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(cache_dir) -> Path:
    """The unpacked embedded model (its tokenizer builds tiny-random), verified once, shared by link."""
    from harness.inputs.models import materialize_embedded

    return materialize_embedded("smollm2-135m-instruct", cache_dir)


def new_cache(folder: Path, embedded: Path) -> Path:
    (folder / "models").mkdir(parents=True)
    (folder / "models" / embedded.name).symlink_to(embedded, target_is_directory=True)
    return folder


def sweep(cache_root: Path, results: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("sweep", *SWEEP, f"paths.results={results}", *overrides, cache=cache_root)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, embedded):
    """An uninterrupted sweep: (cache, results folder)."""
    root = tmp_path_factory.mktemp("baseline")
    cache_root = new_cache(root / "cache", embedded)
    result = sweep(cache_root, root / "results")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(root / "results" / "k")
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    return cache_root, root / "results" / "k"


def test_damaged_checkpoint_and_log_prob_caches_are_rebuilt_with_the_same_numbers(tmp_path, baseline):
    cache_root, folder = baseline
    dpo = next(r for r in read_records(folder) if r["method"] == "dpo")
    weights = cache_root / "checkpoints" / dpo["run_id"] / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # (a) a truncated checkpoint
    references = cache_entries(cache_root / "reference_logprobs")  # without build_once's locks and builds.jsonl
    pairs = sorted(cache_entries(cache_root / "tasks" / "pair_logps"))
    assert len(references) == 1 and len(pairs) == 3
    for path in references + pairs:  # (c) one flipped byte near the end: a changed number
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 1
        path.write_bytes(bytes(raw))

    result = sweep(cache_root, tmp_path)  # a new results folder: every run is scored again
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert (f"cache: checkpoint {weights.parent} damaged (model.safetensors: {size // 2} bytes, the manifest says "
            f"{size}); rebuilding") in output
    assert f"cache: reference log-probs {references[0]} damaged (SHA-256 differs from the header); rebuilding" in output
    damaged = re.findall(r"cache: pair log-probs (\S+) damaged \(SHA-256 differs from the header\); rebuilding", output)
    assert len(damaged) == 2 and set(damaged) < {str(p) for p in pairs}  # the start's and kto's (dpo's keys are new)
    records = read_records(tmp_path / "k")
    assert all(r["status"] == "ok" for r in records)
    assert next(r for r in records if r["method"] == "dpo")["consumed"]["reference_cache"] == "miss"  # recomputed
    assert metrics(tmp_path / "k") == metrics(folder)  # bit-identical
    assert entry_damage(weights.parent) is None


def test_a_sweep_removes_dead_writers_temporaries_and_keeps_live_ones(baseline):
    cache_root, folder = baseline
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [cache_root / "checkpoints" / f".0123456789abcdef.{dead}.tmp", cache_root / "models" /
                 f".tiny-random-0.{dead}.tmp", folder / f".records.jsonl.{dead}.tmp",
                 cache_root / "tasks" / "pair_logps" / f".abc.json.{dead}.tmp", folder / "plots" / f".tasks.png.{dead}.tmp"]
        kept = [cache_root / "checkpoints" / f".fedcba9876543210.{live.pid}.tmp",
                folder / f".records.jsonl.{live.pid}.tmp"]
        for path in stale[:2] + kept[:1]:
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"w" * 1500)
        for path in stale[2:] + kept[1:]:
            path.write_bytes(b"t" * 20)
        result = sweep(cache_root, folder.parent)  # all done before: only the clean-up and the leaderboard
        assert result.returncode == 0, result.stderr[-3000:]
        output = result.stdout + result.stderr
        for path in stale:
            size = "1.5 KB" if path in stale[:2] else "20 bytes"
            assert f"removed stale temporary {path} ({size}; its writer, pid {dead}, is gone)" in output
            assert not path.exists()
        assert all(path.exists() for path in kept)
        assert output.count("done before, skipped") == 3
    finally:
        live.kill()
        live.wait()
    for path in kept:
        cache.discard(path)


def test_a_sweep_killed_anywhere_and_rerun_ends_as_an_uninterrupted_one(tmp_path, baseline, embedded):
    """SIGKILL inside a model save, a record write, a checkpoint write, a curve write and the leaderboard write;
    each rerun goes on from there. The final records equal the uninterrupted run's, bit for bit."""
    cache_root, results = new_cache(tmp_path / "cache", embedded), tmp_path / "results"
    folder = results / "k"
    chain = [  # (kill point, records after the killed run, where the killed write's temporary is)
        ("model_save:1", 0, "cache/models/.tiny-random-*.*.tmp"),
        ("record_write:2", 1, "results/k/.records.jsonl.*.tmp"),        # the start's written, dpo's killed
        ("checkpoint_write:1", 2, "cache/checkpoints/.*.tmp"),         # dpo scored; kto's checkpoint killed
        ("curve_write:1", 2, "results/k/curves/.*.jsonl.*.tmp"),       # kto retrained and published
        ("leaderboard_write:1", 3, "results/k/.leaderboard.md.*.tmp"),  # kto scored
    ]
    finished: dict = {}
    for point, count, temporary in chain:
        result = sweep(cache_root, results, f"debug.kill_at={point}")
        assert result.returncode == -9, f"{point}: {result.returncode}\n{result.stderr[-3000:]}"
        records = read_records(folder)
        assert len(records) == count, point
        assert len(list(tmp_path.glob(temporary))) == 1, f"{point}: no temporary {temporary}"
        for record in records:  # finished work is never redone
            finished.setdefault((record["run_id"], record["task_key"]), record["finished_at"])
            assert finished[(record["run_id"], record["task_key"])] == record["finished_at"]

    result = sweep(cache_root, results)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "leaderboard.md").exists()
    records = read_records(folder)
    keys = [(r["run_id"], r["task_key"]) for r in records]
    assert len(keys) == len(set(keys)) == 3 and all(r["status"] == "ok" for r in records)
    assert metrics(folder) == metrics(baseline[1])  # same (run, task) keys, same numbers bit for bit
    assert not temporaries(cache_root, results)
