"""Readable names for the leaderboard's tasks and metrics: ``heldout_preference/avg_logp_accuracy`` →
"Held-out pref. acc. (avg log-p)".

Each task config names its own in a ``display:`` block (``conf/task/<name>.yaml``; read by the leaderboard only,
never part of a score key)::

    display:
      task: TruthfulQA            # the task's name in titles and the forest plot
      metrics:                    # metric key → its column label
        mc1: TruthfulQA MC1

The block travels in every record's ``task_config``; a record written before it existed gets the current config's
block (``conf/task/<task>.yaml``, when the task is still known), and a metric named by neither is prettified
with its task's (``gsm8k/exact_match_flexible`` → "GSM8K: Exact match flexible"). A breakdown ``toxic_share/group=women`` is its metric's label
and the group: "Toxic share · women". Labels are for people; the CSV keeps the raw keys (it is for machines),
the HTML page shows each raw key on hover.
"""

from __future__ import annotations

import re

from harness.inputs.paths import shipped_config

ABBREVIATIONS = {"mc1": "MC1", "mc2": "MC2", "logp": "log-p", "avg": "avg", "kl": "KL", "lc": "LC", "id": "ID"}


def prettify(name: str) -> str:
    """A raw key made readable without a configured label: ``exact_match_flexible`` → "Exact match flexible"."""
    words = [ABBREVIATIONS.get(word.lower(), word) for word in re.split(r"[_\s]+", name.strip()) if word]
    if not words:
        return name
    first = words[0]
    return " ".join([first[:1].upper() + first[1:], *words[1:]])


def configured_display(task: str) -> dict:
    """The ``display`` block of the current ``conf/task/<task>.yaml``; {} when the task or the block is unknown
    (the report reads files, not the registry: harness.run sits above it, tests/test_architecture.py)."""
    display = shipped_config("task", task).get("display")
    return display if isinstance(display, dict) else {}


class Labels:
    """Display names for the tasks and ``task/metric`` columns of a set of records."""

    def __init__(self, records: list[dict]):
        self.display: dict[str, dict] = {}
        for record in records:   # the newest record of a task wins (records are oldest first)
            display = (record.get("task_config") or {}).get("display")
            if isinstance(display, dict):
                self.display[record["task"]] = display
        for task in {record["task"] for record in records} - set(self.display):
            self.display[task] = configured_display(task)

    def task(self, task: str) -> str:
        if task == "unified":
            return "Unified score"
        return str((self.display.get(task) or {}).get("task") or prettify(task))

    def metric(self, task: str, metric: str) -> str:
        """The label of ``metric`` of ``task``; a breakdown (``toxic_share/group=women``) is its base metric's label
        and the group."""
        configured = (self.display.get(task) or {}).get("metrics") or {}
        if metric in configured:
            return str(configured[metric])
        if "/" in metric:
            base, part = metric.split("/", 1)
            return f"{self.metric(task, base)} · {part.split('=', 1)[-1]}"
        if metric == "score":
            return f"{self.task(task)} score"
        return f"{self.task(task)}: {prettify(metric)}"

    def score(self, task: str, metrics: dict[str, bool]) -> str:
        """The label of ``task``'s score (what its Δ compares), from its primary metrics {name: higher_is_better}: the
        metric's own when the score is one metric, higher better ("TruthfulQA MC2"); else the task's ("Toxicity": a
        mean, or a metric inverted to higher-better, is the task score the legend describes)."""
        if len(metrics) == 1 and all(metrics.values()):
            return self.metric(task, next(iter(metrics)))
        return self.task(task)

    def column(self, column: str) -> str:
        """The label of a ``task/metric`` column."""
        task, metric = column.split("/", 1)
        return self.metric(task, metric)
