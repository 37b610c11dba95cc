"""What the leaderboard shows first: each row's difference from its start row per task (the forest plot), the
significance mark, one headline metric per task for the main table, and the anchored colour scales.

A difference is the board's paired difference (``Board.paired_difference`` / ``unified_difference``: a dict
``{difference, low, high, items}``, multi-seed rows add ``seeds`` and ``seed_sd``); its interval is read from the
dict, never recomputed here. **Significant** = the 95 % interval excludes 0; every export marks it with
``MARK`` and says so in ``LEGEND``.

**Colour scales are anchored**, never the data's min–max, so equal scores look equal: a score in [0, 1] on
[0, 1] (``SCORE_SCALE``); a difference on a diverging scale symmetric around 0 that spans at least
``DIFFERENCE_MIN_SPAN`` either side (``difference_span``).
"""

from __future__ import annotations

from harness.report.board import START, Board, primary_metrics

MARK = "*"
LEGEND_TEXT = ("the 95 % paired bootstrap interval of the difference from the start row excludes 0 "
               "(significant at the 5 % level).")
LEGEND = f"{MARK} = {LEGEND_TEXT}"
SCORE_SCALE = (0.0, 1.0)       # colour scale of scores in [0, 1] (unified score, accuracies, shares)
DIFFERENCE_MIN_SPAN = 0.1      # a difference scale spans at least ±0.1 (10 points of a [0, 1] score)
UNIFIED = "unified"            # the forest plot's task name for the unified score


def significant(difference: dict | None) -> bool | None:
    """Whether the difference's 95 % interval excludes 0; None when there is no interval (not comparable, no
    per-item scores, the start row itself)."""
    if not difference or difference.get("low") is None or difference.get("high") is None:
        return None
    return difference["low"] > 0 or difference["high"] < 0


def headline_metric(board: Board, task: str) -> str | None:
    """The metric the main table shows for ``task``: its first primary metric (the task config's
    ``primary_metrics``, else the first metric in [0, 1] without a ``/`` breakdown), else its first metric. A task
    whose score is one primary metric shows that metric, so its column and its Δ (the task score's) are one metric."""
    for key in board.keys:
        record = board.record(key, task)
        if record:
            names = primary_metrics(record) or [m for m in record.get("metrics") or {} if "/" not in m]
            if names:
                return names[0]
    return None


def score_metrics(board: Board, task: str) -> dict[str, bool]:
    """The primary metrics ``task``'s score averages (``harness.report.board.primary_metrics``), each with its
    ``higher_is_better``, as the first row scored on it has them: what its Δ compares, named by ``Labels.score``."""
    for key in board.keys:
        record = board.record(key, task)
        if record:
            metrics = record["metrics"]
            return {name: bool(metrics[name].get("higher_is_better", True)) for name in primary_metrics(record)}
    return {}


def forest_rows(board: Board) -> list[dict]:
    """Every non-start row's difference from its start row — the unified score, then each task's score (primary
    metrics mapped to [0, 1], higher better) — one dict each: ``family``, ``setting``, ``variant``, ``task``,
    the difference's keys (``difference``, ``low``, ``high``, ``items``, ...) or its ``note``, and
    ``significant``. Rows without a start row, failed rows and tasks neither row was scored on are left out."""
    out = []
    for key in board.keys:
        start = board.start_key(key)
        if start is None or start == key or board.variants[key] == START or board.unified(key)[0] is None:
            continue
        differences = [(UNIFIED, board.unified_difference(key, start))]
        differences += [(task, board.paired_difference(key, start, task)) for task in board.tasks
                        if board.task_score(key, task) is not None]
        for task, difference in differences:
            if difference is None:
                difference = {"note": "no per-item scores"}
            out.append({"family": key[0], "setting": key[1], "variant": key[2], "task": task, **difference,
                        "significant": significant(difference)})
    return out


def difference_span(differences: list[dict]) -> float:
    """Half-width of a symmetric scale around 0 holding every interval: at least ``DIFFERENCE_MIN_SPAN``."""
    ends = [abs(d[part]) for d in differences for part in ("low", "high", "difference") if d.get(part) is not None]
    return max([DIFFERENCE_MIN_SPAN, *ends])


def difference_colour(value: float, span: float = DIFFERENCE_MIN_SPAN) -> str:
    """A CSS colour for a difference on a fixed diverging scale: green above 0, red below, full strength at
    ±``span`` and beyond, white at 0."""
    strength = min(1.0, abs(value) / span)
    ends = (26, 152, 80) if value > 0 else (215, 48, 39)
    mix = [round(255 + (end - 255) * 0.6 * strength) for end in ends]
    return "#" + "".join(f"{channel:02x}" for channel in mix)

