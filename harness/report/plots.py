"""Leaderboard plots (PNG and SVG): per-task bars with ± standard-error whiskers, the variant ×
setting heatmap of the unified score, win rate against mean output length, and training curves."""

from __future__ import annotations

import json
from pathlib import Path

from harness.inputs.paths import temporary_path
from harness.report.board import matrix

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
    plots = {"tasks": task_bars(board, folder), "heatmap": heatmap(board, folder)}
    scatter = win_rate_vs_length(board, folder)
    if scatter:
        plots["win_rate_vs_length"] = scatter
    curves = training_curves(board, folder)
    if curves:
        plots["curves"] = curves
    return plots


def task_bars(board, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    columns = [c for c in board.metric_names() if "/" not in c.split("/", 1)[1]]
    keys = [k for k in board.keys if board.status(k)[0] == "ok"]
    if not columns or not keys:
        figure, axis = plt.subplots(figsize=(5, 2))
        axis.text(0.5, 0.5, "no scored runs yet", ha="center", va="center")
        axis.axis("off")
        return _save(figure, folder, "tasks")
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
        axis.set_title(f"{board.marked(column)} ({'higher' if higher else 'lower'} is better)", fontsize=9)
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


def heatmap(board, folder: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    labels, settings, cells = matrix(board)
    values = np.array([[cells.get((v, s)) if cells.get((v, s)) is not None else np.nan for s in settings]
                       for v in labels], dtype=float)
    figure, axis = plt.subplots(figsize=(1.6 * len(settings) + 2.5, 0.45 * len(labels) + 1.5))
    image = axis.imshow(values, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(settings)), settings, fontsize=8)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(settings)):
            if not np.isnan(values[i, j]):
                axis.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, ax=axis, label="unified score")
    axis.set_title("unified alignment score: variant × setting", fontsize=9)
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
