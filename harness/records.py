"""Records: one self-describing JSON object per (run, task) in ``results/<sweep>/records.jsonl``.

A record is the unit of exchange: the leaderboard is rebuilt from records alone, and records
from several machines can be concatenated or merged (``merge_results``). Writing is atomic (the whole file is
rewritten to a temporary name and renamed, under an ``fcntl`` lock on ``.records.lock``), so a killed sweep never
leaves a half-written line, and concurrent writers (the jobs of a fanned-out sweep, ``harness.run.fanout``) take
turns: none loses or duplicates another's record.

Fields: ``run_id`` (hash of the resolved run config), ``task_key`` (task name + config hash),
``sweep``, ``family``, ``setting``, ``method``, ``task``, ``task_version``, ``metrics``
(``{name: {value, stderr, higher_is_better}}``), ``budget`` (configured), ``consumed``
(steps, examples, pairs, policy/reference tokens, FLOPs, wall seconds, peak memory),
``seed``, ``versions``, ``chat_template``, ``started_at``, ``finished_at``, ``status``
(``ok`` | ``failed`` | ``skipped``), ``reason``, ``samples_file``, ``run_config``.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.paths import atomic_write_text

RECORDS_FILE = "records.jsonl"
STATUSES = ("ok", "failed", "skipped")
REQUIRED_FIELDS = ("run_id", "task_key", "sweep", "family", "setting", "method", "task", "status")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of everything that can move a number."""
    import importlib.metadata as metadata

    out = {"harness_git_sha": _git_sha()}
    for package in ("alignment-harness", "torch", "transformers", "trl", "lm-eval", "datasets", "peft", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".records.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_records(folder: Path) -> list[dict]:
    """All records of a results folder (or of a records file), in write order."""
    folder = Path(folder)
    path = folder if folder.is_file() else folder / RECORDS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HarnessError(f"{path}:{number}: not a JSON record ({error.msg}); fix or remove the line") from None
        problem = record_problem(record)
        if problem:
            raise HarnessError(f"{path}:{number}: {problem}; fix or remove the line")
        records.append(record)
    return records


def record_problem(record) -> str | None:
    """What makes ``record`` unreadable for the sweep and the leaderboard (None when nothing does): the required
    fields, ``status``, and ``metrics`` as ``{name: {value: number|null, stderr: number|null, higher_is_better: bool}}``."""
    if not isinstance(record, dict):
        return f"a record is a JSON object, not {type(record).__name__}"
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        return f"record lacks field {missing[0]!r}"
    for field in REQUIRED_FIELDS:
        if not isinstance(record[field], str):
            return f"field {field!r} is {record[field]!r}, not a string"
    if record["status"] not in STATUSES:
        return f"field 'status' is {record['status']!r}, not one of {', '.join(STATUSES)}"
    metrics = record.get("metrics")
    if metrics is None and record["status"] == "ok":
        return "an ok record lacks field 'metrics'"
    if metrics is not None and not isinstance(metrics, dict):
        return f"field 'metrics' is {metrics!r}, not an object {{name: {{value, stderr, higher_is_better}}}}"
    for name, metric in (metrics or {}).items():
        if not isinstance(metric, dict):
            return f"metrics.{name} is {metric!r}, not an object {{value, stderr, higher_is_better}}"
        for part in ("value", "stderr"):
            value = metric.get(part)
            if part not in metric or isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
                return f"metrics.{name}.{part} is {value!r}, not a number or null"
        if not isinstance(metric.get("higher_is_better"), bool):
            return f"metrics.{name}.higher_is_better is {metric.get('higher_is_better')!r}, not true or false"
    for field in ("consumed", "budget"):
        if record.get(field) is not None and not isinstance(record[field], dict):
            return f"field {field!r} is {record[field]!r}, not an object"
    return None


def latest_records(records: list[dict]) -> list[dict]:
    """The newest record per (run_id, task_key): a re-run after a failure replaces the failure."""
    latest: dict[tuple, dict] = {}
    for record in records:
        latest[(record["run_id"], record["task_key"])] = record
    return list(latest.values())


def append_record(folder: Path, record: dict) -> None:
    """Add one record atomically; a record for the same (run, task) replaces the older one."""
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}")
    line = json.dumps(record, sort_keys=True, default=str)
    with _locked(folder):
        kept = [r for r in read_records(folder) if (r["run_id"], r["task_key"]) != (record["run_id"], record["task_key"])]
        text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in kept) + line + "\n"
        atomic_write_text(folder / RECORDS_FILE, text, point="record_write")


def merge_results(folders: list[Path], into: Path) -> int:
    """Results folders from several machines (or fanned-out jobs that wrote apart) merged into ``into``: the newest
    record per (run, task) by ``finished_at`` — an ``ok`` one over a ``failed`` or ``skipped`` one at any time — and
    every per-run file beside them (samples, curves, logs, feedback items) copied over. ``into`` may be one of
    ``folders``. Returns the number of records kept."""
    import shutil

    into = Path(into)
    chosen: dict[tuple, dict] = {}
    for folder in folders:
        folder = Path(folder)
        if not (folder / RECORDS_FILE).is_file():
            raise HarnessError(f"{folder} holds no {RECORDS_FILE}; pass results folders, e.g. results/<sweep>")
        for record in read_records(folder):
            key = (record["run_id"], record["task_key"])
            rank = (record["status"] == "ok", str(record.get("finished_at") or ""))
            old = chosen.get(key)
            if old is None or rank >= (old["status"] == "ok", str(old.get("finished_at") or "")):
                chosen[key] = record
        if folder.resolve() != into.resolve():
            for sub in ("samples", "curves", "logs", "feedback"):
                if (folder / sub).is_dir():
                    shutil.copytree(folder / sub, into / sub, dirs_exist_ok=True)
            for name in ("sweep_config.yaml", "published.json"):
                if (folder / name).is_file() and not (into / name).exists():
                    into.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(folder / name, into / name)
    records = sorted(chosen.values(), key=lambda r: str(r.get("finished_at") or ""))
    with _locked(into):
        atomic_write_text(into / RECORDS_FILE, "".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                                       for r in records), point="record_write")
    return len(records)


def finished_keys(folder: Path) -> set[tuple[str, str]]:
    """(run_id, task_key) pairs that need no more work: those with an ``ok`` record.

    ``failed`` and ``skipped`` ones are tried again on the next run (a skip is cheap to re-check,
    and the reason may be gone: the hub reachable, the checkpoint key set).
    """
    return {(r["run_id"], r["task_key"]) for r in read_records(folder) if r["status"] == "ok"}


def write_samples(folder: Path, run_id: str, task_key: str, samples: list[dict]) -> str:
    """Per-sample outputs beside the records; returns the path relative to ``folder``."""
    relative = Path("samples") / run_id / f"{task_key}.jsonl"
    text = "".join(json.dumps(sample, default=str, ensure_ascii=False) + "\n" for sample in samples)
    atomic_write_text(folder / relative, text)
    return str(relative)
