"""Leaderboard plots (PNG and SVG): the forest plot of each row's difference from its start row (the headline
picture), per-task bars with ± standard-error whiskers, the variant × setting heatmap of the unified score on a
fixed [0, 1] scale, win rate against mean output length, and training curves. A plot with nothing to show is not
written."""

from __future__ import annotations

import json
from pathlib import Path

from harness.inputs.paths import temporary_path
from harness.report.board import matrix
from harness.report.headline import (MARK, SCORE_SCALE, UNIFIED, difference_span, forest_rows, headline_metric,
                                     score_metrics)
from harness.report.labels import Labels

CURVE_PANELS = [
    # (log key, panel title): what TRL trainers log per step
    ("loss", "training loss"),
    ("rewards/margins", "reward margin (chosen − rejected)"),
    ("logps/chosen", "log-prob of chosen"),
    ("logps/rejected", "log-prob of rejected"),
    ("kl", "KL to the reference"),
]


def _save(figure, folder: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        tmp = temporary_path(folder / f"{name}.{suffix}")  # written whole, then renamed
        figure.savefig(tmp, dpi=110, format=suffix)
        tmp.replace(folder / f"{name}.{suffix}")
    plt.close(figure)
    return folder / f"{name}.png"


def write_plots(board, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    makers = {"forest": forest_plot, "tasks": task_bars, "heatmap": heatmap, "win_rate_vs_length": win_rate_vs_length,
              "curves": training_curves}
    plots = {name: make(board, folder) for name, make in makers.items()}
    return {name: path for name, path in plots.items() if path}   # a plot with nothing to show is not written


FOREST_COLOURS = {True: "#1a9850", False: "#d73027"}   # significant above 0 / below 0; not significant: grey


def forest_plot(board, folder: Path) -> Path | None:
    """Each non-start row's difference from its start row, a panel per task (the unified score first), a line per
    row grouped by (family, setting): the point, its 95 % interval, a zero line; a significant difference (interval
    excludes 0) is a filled coloured marker with ``*``, the rest hollow grey. One x scale for every panel, symmetric
    around 0 and at least ±``DIFFERENCE_MIN_SPAN`` wide. None when no row has a start row to differ from."""
    import matplotlib.pyplot as plt

    rows = forest_rows(board)
    if not rows:
        return None
    labels = Labels(board.records)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = list(dict.fromkeys((r["family"], r["setting"], r["variant"]) for r in rows))
    groups = list(dict.fromkeys(line[:2] for line in lines))
    positions, y, ticks = {}, 0.0, []
    for group in groups:          # top to bottom: a gap and a heading per (family, setting)
        ticks.append((y, f"{group[0]} · {group[1]}", True))
        y += 1
        for line in (line for line in lines if line[:2] == group):
            positions[line] = y
            ticks.append((y, line[2], False))
            y += 1
        y += 0.4
    span = difference_span([r for r in rows if "difference" in r]) * 1.08
    height = 1.0 + 0.2 * y
    figure, axes = plt.subplots(1, len(tasks), figsize=(max(6.0, 2.5 * len(tasks) + 2.2), max(2.6, height)),
                                sharey=True, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        axis.axvline(0, color="#444", linewidth=0.8)
        for row in (r for r in rows if r["task"] == task):
            position = positions[(row["family"], row["setting"], row["variant"])]
            if "difference" not in row:
                axis.text(0, position, " n/c", fontsize=6, color="#888", va="center")   # not comparable: the tables say why
                continue
            mark = row["significant"]
            colour = FOREST_COLOURS[row["difference"] > 0] if mark else "#888888"
            axis.plot([row["low"], row["high"]], [position, position], color=colour, linewidth=1.6 if mark else 1.0)
            axis.plot(row["difference"], position, "o", markersize=5, color=colour,
                      markerfacecolor=colour if mark else "white")
            if mark:
                axis.text(row["high"], position, f" {MARK}", fontsize=9, color=colour, va="center", fontweight="bold")
        axis.set_xlim(-span, span)
        judge = board.judge_mark(task) if task != "unified" else ""  # † a judge below its baselines: footnote below
        title = labels.task(task) if task == UNIFIED else labels.score(task, score_metrics(board, task))
        axis.set_title(title + (f" {judge}" if judge else ""), fontsize=9)
        axis.grid(axis="x", alpha=0.3)
        axis.tick_params(axis="x", labelsize=7)
        axis.set_xlabel("Δ from start (higher = better)", fontsize=7)
    first = axes[0][0]
    first.set_ylim(y - 0.4, -1)
    first.set_yticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=7)
    for tick, (_, _, heading) in zip(first.get_yticklabels(), ticks):
        if heading:
            tick.set_fontweight("bold")
    figure.suptitle("Difference from the start row (task scores in [0, 1], higher = better): mean paired difference "
                    f"and 95 % interval; filled, coloured and {MARK} = the interval excludes 0", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.45 / figure.get_figheight()))
    judge_footnote(figure, board.judge_footnotes([t for t in tasks if t != "unified"]))
    return _save(figure, folder, "forest")


def task_bars(board, folder: Path) -> Path | None:
    """A panel per task (its headline metric, ``headline_metric``), a bar per row; None when no row was scored."""
    import matplotlib.pyplot as plt

    columns = [f"{task}/{name}" for task, name in ((t, headline_metric(board, t)) for t in board.tasks) if name]
    keys = [k for k in board.keys if board.status(k)[0] == "ok"]
    if not columns or not keys:
        return None
    names = Labels(board.records)
    width = max(4.5, 0.5 * len(keys) + 2)
    figure, axes = plt.subplots(len(columns), 1, figsize=(width, 2.6 * len(columns)), squeeze=False)
    labels = [f"{k[1]}\n{k[2]}" for k in keys]
    variants = list(dict.fromkeys(k[2] for k in keys if board.variants[k] != "start"))
    colors = ["#9a9a9a" if board.variants[k] == "start" else f"C{variants.index(k[2]) % 10}" for k in keys]
    for axis, column in zip(axes[:, 0], columns):
        metrics = [board.metric(k, column) or {} for k in keys]
        values = [m.get("value") if m.get("value") is not None else float("nan") for m in metrics]
        errors = [m.get("stderr") or 0.0 for m in metrics]
        axis.bar(range(len(keys)), values, yerr=errors, capsize=3, color=colors)
        axis.set_xticks(range(len(keys)), labels, fontsize=7)
        higher = next((m.get("higher_is_better") for m in metrics if m), True)
        mark = board.judge_mark(column.split("/", 1)[0])  # † a task whose judge is below its baselines
        axis.set_title(f"{names.column(column)}{' ' + mark if mark else ''} ({'higher' if higher else 'lower'} is better)",
                       fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("grey = starting checkpoint; whiskers = ± 1 standard error", fontsize=9)
    figure.tight_layout()
    judge_footnote(figure, board.judge_footnotes(list(dict.fromkeys(c.split("/", 1)[0] for c in columns))))
    return _save(figure, folder, "tasks")


def judge_footnote(figure, lines: list[str]) -> None:
    """The judge warnings (``Board.judge_footnotes``) under a figure, in room made for them."""
    if not lines:
        return
    height = figure.get_figheight()
    extra = 0.22 * len(lines) + 0.1
    figure.set_figheight(height + extra)
    figure.subplots_adjust(bottom=(figure.subplotpars.bottom * height + extra) / (height + extra))
    figure.text(0.01, 0.01, "\n".join(lines), fontsize=7, ha="left", va="bottom", wrap=True, color="#8a4b00")


def heatmap_columns(labels: list[str], settings: list[str], cells: dict) -> tuple[list[str], list[str]]:
    """The heatmap's columns and the settings it leaves out: a setting without a single score (every row skipped, e.g.
    its checkpoint needs the hub) is named below the plot, not drawn as an empty column."""
    empty = [s for s in settings if all(cells.get((v, s)) is None for v in labels)]
    return [s for s in settings if s not in empty], empty


def heatmap(board, folder: Path) -> Path | None:
    """Unified score per variant × (family · setting) on a fixed [0, 1] colour scale; None when no row has one."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels, settings, cells = matrix(board)
    if all(value is None for value in cells.values()):
        return None
    settings, empty = heatmap_columns(labels, settings, cells)
    values = np.array([[cells.get((v, s)) if cells.get((v, s)) is not None else np.nan for s in settings]
                       for v in labels], dtype=float)
    figure, axis = plt.subplots(figsize=(1.6 * len(settings) + 2.5, 0.45 * len(labels) + 1.5))
    # anchored at [0, 1], never the data's min-max: 0.377 and 0.422 are close in colour because they are close
    image = axis.imshow(values, cmap="viridis", aspect="auto", vmin=SCORE_SCALE[0], vmax=SCORE_SCALE[1])
    axis.set_xticks(range(len(settings)), settings, fontsize=8)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(settings)):
            if not np.isnan(values[i, j]):
                axis.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=7,
                          color="black" if values[i, j] > 0.6 else "white")   # viridis is light above ~0.6
    figure.colorbar(image, ax=axis, label="unified score (fixed scale 0–1)")
    axis.set_title("unified alignment score: variant × setting", fontsize=9)
    if empty:
        axis.set_xlabel(f"not scored (skipped or failed; the leaderboard says why): {', '.join(empty)}", fontsize=7)
    figure.tight_layout()
    judge_footnote(figure, board.judge_footnotes())
    return _save(figure, folder, "heatmap")


def win_rate_vs_length(board, folder: Path) -> Path | None:
    """Win rate against the mean output length, when a win-rate task was scored."""
    import matplotlib.pyplot as plt

    points = []
    for key in board.keys:
        for record in board.by_key(key):
            metrics = record.get("metrics") or {}
            rate = next((v for n, v in metrics.items() if n == "win_rate"), None)
            length = metrics.get("mean_output_chars") or next(  # win_rate's metric; not its length-controlled rate
                (v for n, v in metrics.items() if "length" in n and "reference" not in n and "controlled" not in n), None)
            if rate and length and rate.get("value") is not None and length.get("value") is not None:
                points.append((key, length["value"], rate["value"], rate.get("stderr") or 0.0, record["task"]))
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for key, length, rate, stderr, _ in points:
        axis.errorbar(length, rate, yerr=stderr, fmt="o", capsize=3)
        axis.annotate(f"{key[1]} · {key[2]}", (length, rate), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("mean output length")
    axis.set_ylabel("win rate")
    tasks = list(dict.fromkeys(key_task for _, _, _, _, key_task in points))
    marks = " ".join(dict.fromkeys(board.judge_mark(t) for t in tasks if board.judge_mark(t)))
    axis.set_title(f"win rate against output length (longer is not better){' ' + marks if marks else ''}", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    judge_footnote(figure, board.judge_footnotes(tasks))
    return _save(figure, folder, "win_rate_vs_length")


def training_curves(board, folder: Path) -> Path | None:
    import matplotlib.pyplot as plt

    runs = []
    for key in board.keys:
        run_id = next((r["run_id"] for r in board.by_key(key)), None)
        path = board.folder / "curves" / f"{run_id}.jsonl"
        if board.variants[key] != "start" and path.exists():
            entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            runs.append((key, [e for e in entries if "loss" in e]))
    panels = [(k, t) for k, t in CURVE_PANELS if any(k in e for _, entries in runs for e in entries)]
    if not runs or not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for axis, (log_key, title) in zip(axes[0], panels):
        for key, entries in runs:
            steps = [e.get("step", i + 1) for i, e in enumerate(entries) if log_key in e]
            values = [e[log_key] for e in entries if log_key in e]
            if values:
                axis.plot(steps, values, marker=".", label=f"{key[1]} · {key[2]}")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step", fontsize=8)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, folder, "curves")
