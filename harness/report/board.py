"""The board: a results folder's records grouped into rows, and the numbers every renderer shares.

``harness.report.leaderboard`` (Markdown, CSV, LaTeX), ``harness.report.plots`` and ``harness.report.html``
import this module; it imports none of them.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from harness.records import latest_records, read_records

BOOTSTRAP_SAMPLES = 1000   # resamples of the items for paired intervals
BOOTSTRAP_SEED = 0
CONSUMED_COLUMNS = [
    # (record key, column title)
    ("optimizer_steps", "steps"),
    ("pairs", "pairs"),
    ("policy_tokens", "policy tokens"),
    ("reference_tokens", "ref tokens"),
    ("generation_tokens", "gen tokens"),  # sampled by online methods (prompt + completion), inside FLOPs
    ("flops", "FLOPs"),
    ("match_ratio", "match ratio"),        # budget.match=tokens|flops: consumed / the pair methods' target
    ("wall_seconds", "train s"),
    ("peak_memory_mib", "peak MiB"),
]
SETTING_ORDER = {"pretrained": 0, "sft": 1, "instruct": 2}


# ---------------------------------------------------------------------------------------------
# reading
def primary_metrics(record: dict) -> list[str]:
    configured = (record.get("task_config") or {}).get("primary_metrics")
    if configured:
        return [m for m in configured if m in (record.get("metrics") or {})]
    return [name for name, m in (record.get("metrics") or {}).items()
            if "/" not in name and m.get("value") is not None and 0.0 <= m["value"] <= 1.0]


def mapped(value: float, higher_is_better: bool) -> float:
    return value if higher_is_better else 1.0 - value


def row_key(record: dict) -> tuple:
    return (record.get("family"), record["setting"], record["method"])


def ordered_keys(keys) -> list[tuple]:
    return sorted(set(keys), key=lambda k: (str(k[0]), SETTING_ORDER.get(k[1], 9), k[1], k[2] != "start"))


class Board:
    """The latest records of a folder, grouped by (family, setting, method)."""

    def __init__(self, folder: Path, records: list[dict] | None = None, published: list[dict] | None = None):
        self.folder = Path(folder)
        all_records = read_records(self.folder) if records is None else records
        self.record_count = len(all_records)
        self.records = latest_records(all_records)
        self.published = published if published is not None else read_published(self.folder)
        first_seen: dict[tuple, int] = {}
        for index, record in enumerate(self.records):
            first_seen.setdefault(row_key(record), index)
        self.keys = sorted(first_seen, key=lambda k: (str(k[0]), SETTING_ORDER.get(k[1], 9), k[1],
                                                      k[2] != "start", first_seen[k]))
        self.tasks = list(dict.fromkeys(r["task"] for r in self.records))
        self._items: dict[tuple, dict] = {}

    def by_key(self, key: tuple) -> list[dict]:
        return [r for r in self.records if row_key(r) == key]

    def metric_names(self, *, breakdowns: bool = True) -> list[str]:
        """``task/metric`` columns in task order; without ``breakdowns``, only headline metrics (a breakdown is a
        metric name with a ``/`` of its own, e.g. toxicity's ``toxic_share/group=women``)."""
        names = []
        for task in self.tasks:
            for record in self.records:
                if record["task"] == task:
                    names += [f"{task}/{m}" for m in record.get("metrics") or {} if breakdowns or "/" not in m]
        return list(dict.fromkeys(names))

    def status(self, key: tuple) -> tuple[str, str]:
        bad = [r for r in self.by_key(key) if r["status"] != "ok"]
        return (bad[0]["status"], bad[0].get("reason") or "") if bad else ("ok", "")

    def metric(self, key: tuple, column: str) -> dict | None:
        task, name = column.split("/", 1)
        for record in self.by_key(key):
            if record["task"] == task and record["status"] == "ok":
                return (record.get("metrics") or {}).get(name)
        return None

    def consumed(self, key: tuple) -> dict:
        for record in self.by_key(key):
            if record.get("consumed"):
                return record["consumed"]
        return {}

    def task_score(self, key: tuple, task: str) -> float | None:
        for record in self.by_key(key):
            if record["task"] == task and record["status"] == "ok":
                names = primary_metrics(record)
                if names:
                    return sum(mapped(record["metrics"][n]["value"], record["metrics"][n]["higher_is_better"])
                               for n in names) / len(names)
        return None

    def unified(self, key: tuple) -> tuple[float | None, int]:
        scores = [s for s in (self.task_score(key, t) for t in self.tasks) if s is not None]
        return (sum(scores) / len(scores) if scores else None), len(scores)

    def ranks(self) -> dict[tuple, int | None]:
        out: dict[tuple, int | None] = {}
        groups: dict[tuple, list[tuple]] = {}
        for key in self.keys:
            groups.setdefault(key[:2], []).append(key)
        for members in groups.values():
            complete = max(self.unified(k)[1] for k in members)
            ranked = sorted((k for k in members if self.unified(k)[0] is not None and self.unified(k)[1] == complete),
                            key=lambda k: -self.unified(k)[0])
            for key in members:
                out[key] = ranked.index(key) + 1 if key in ranked else None
        return out

    # per-item scores for paired comparisons ------------------------------------------------
    def item_task_scores(self, key: tuple, task: str) -> dict[str, float]:
        """Per item: the mean of this task's mapped primary-metric scores (from the samples file)."""
        cache_key = (key, task)
        if cache_key in self._items:
            return self._items[cache_key]
        scores: dict[str, list[float]] = {}
        for record in self.by_key(key):
            if record["task"] != task or record["status"] != "ok" or not record.get("samples_file"):
                continue
            path = self.folder / record["samples_file"]
            if not path.exists():
                continue
            wanted = {n: record["metrics"][n]["higher_is_better"] for n in primary_metrics(record)}
            for line in path.read_text(encoding="utf-8").splitlines():
                sample = json.loads(line)
                if "item_id" not in sample:
                    continue
                for name, value in (sample.get("scores") or {}).items():
                    if name in wanted and value is not None:
                        scores.setdefault(str(sample["item_id"]), []).append(mapped(float(value), wanted[name]))
        result = {item: sum(v) / len(v) for item, v in scores.items()}
        self._items[cache_key] = result
        return result

    def paired_difference(self, key: tuple, other: tuple, task: str) -> dict | None:
        return paired_bootstrap(self.item_task_scores(key, task), self.item_task_scores(other, task))


def paired_bootstrap(a: dict[str, float], b: dict[str, float], *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Mean of a − b over the items both have, with a percentile 95% interval from resampling items."""
    items = sorted(set(a) & set(b))
    if not items:
        return None
    differences = [a[i] - b[i] for i in items]
    n = len(differences)
    mean = sum(differences) / n
    generator = random.Random(seed)
    means = sorted(sum(differences[generator.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    low, high = means[int(0.025 * samples)], means[min(samples - 1, int(math.ceil(0.975 * samples)) - 1)]
    return {"difference": mean, "low": low, "high": high, "items": n}


def read_published(folder: Path) -> list[dict]:
    path = Path(folder) / "published.json"
    return json.loads(path.read_text()) if path.exists() else []


def table_rows(board: Board) -> list[dict]:
    """Everything the tables show, one dict per (family, setting, method), unrounded."""
    ranks = board.ranks()
    rows = []
    for key in board.keys:
        family, setting, method = key
        unified, tasks_scored = board.unified(key)
        status, reason = board.status(key)
        row = {"family": family, "setting": setting, "method": method, "unified_score": unified,
               "rank": ranks.get(key), "tasks_scored": tasks_scored}
        for column in board.metric_names():
            metric = board.metric(key, column)
            row[column] = metric.get("value") if metric else None
            row[column + " stderr"] = metric.get("stderr") if metric else None
        start = (family, setting, "start")
        for task in board.tasks:
            difference = board.paired_difference(key, start, task) if method != "start" and start in board.keys else None
            row[f"delta {task}"] = difference["difference"] if difference else None
            row[f"delta {task} low"] = difference["low"] if difference else None
            row[f"delta {task} high"] = difference["high"] if difference else None
        consumed = board.consumed(key)
        for name, _ in CONSUMED_COLUMNS:
            row[name] = consumed.get(name)
        row["status"], row["reason"] = status, reason
        rows.append(row)
    return rows


def matrix(board: Board) -> tuple[list[str], list[str], dict[tuple, float | None]]:
    methods = list(dict.fromkeys(k[2] for k in board.keys))
    settings = list(dict.fromkeys(f"{k[0]} · {k[1]}" for k in board.keys))
    cells = {(k[2], f"{k[0]} · {k[1]}"): board.unified(k)[0] for k in board.keys}
    return methods, settings, cells
