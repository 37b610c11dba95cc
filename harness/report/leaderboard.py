"""The leaderboard: rebuilt from records alone (any folder of them, merged from any machines).

``build_leaderboard(folder)`` writes into ``folder``:

* ``leaderboard.md`` — per (family, setting): a row per variant (the starting checkpoint and each method
  under each hyperparameter set); columns = every headline task metric ± standard error, the unified
  alignment score with its rank, the alignment tax or gain per task (Δ: difference from the start row,
  paired bootstrap 95% interval over the same items, or why it is not comparable) and the budget
  consumed; then the Δ of every metric in [0, 1], each task's breakdowns, the variant × setting matrix of
  the unified score, and published reference rows where an experiment config carries them;
* ``leaderboard.csv`` — one row per (family, setting, variant): every number above, unrounded;
* ``leaderboard.tex`` — booktabs tables, best value per column in bold;
* ``leaderboard.html`` — one self-contained page (``harness.report.html``);
* ``plots/*.png`` and ``plots/*.svg`` (``harness.report.plots``).

What a row is, when two rows are comparable, the unified score, the tie rule of the rank and the intervals:
``harness.report.board``.
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.paths import atomic_write_text
from harness.records import read_records
from harness.report.board import (BOOTSTRAP_SAMPLES, CONSUMED_COLUMNS, TIE_TOLERANCE, Board, compare, matrix,
                                  paired_bootstrap, table_rows)
from harness.report.html import html_page
from harness.report.plots import write_plots

# Board, compare and paired_bootstrap live in harness.report.board; importers may take them from here too
__all__ = ["Board", "build_leaderboard", "compare", "compare_text", "csv_text", "latex", "markdown", "paired_bootstrap"]


# ---------------------------------------------------------------------------------------------
# formatting
def fmt_value(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "—"
    if metric.get("stderr") is None:
        return f"{metric['value']:.4f}"
    return f"{metric['value']:.4f} ± {metric['stderr']:.4f}"


def fmt_number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    value = float(value)
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    if value.is_integer():
        return f"{int(value)}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"  # ratios such as the match ratio keep 3 decimals


def signed(value: float, digits: int = 3) -> str:
    """``+0.250``; a value that rounds to zero is ``+0.000``, never ``-0.000``."""
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text


def fmt_difference(difference: dict | None, digits: int = 3) -> str:
    """``+0.250 [+0.000, +0.750]``, the reason a difference is not comparable, or ``—``."""
    if not difference:
        return "—"
    if "difference" not in difference:
        return difference.get("note") or "—"
    return (f"{signed(difference['difference'], digits)} [{signed(difference['low'], digits)}, "
            f"{signed(difference['high'], digits)}]")


def direction(board: Board, keys: list[tuple], column: str) -> str:
    higher = next((m.get("higher_is_better") for m in (board.metric(k, column, fill=False) for k in keys) if m), None)
    return "" if higher is None else f" ({'higher' if higher else 'lower'} better)"


# ---------------------------------------------------------------------------------------------
# Markdown
def markdown(board: Board) -> str:
    """Per (family, setting): a table of headline metrics, Δ, budget; then the Δ of each metric in [0, 1] and each
    task's breakdowns (per group, hate / neutral, ...), transposed. The CSV has every column in one table."""
    ranks = board.ranks()
    metrics = board.metric_names(breakdowns=False)
    breakdowns = [m for m in board.metric_names() if m not in metrics]
    bounded_metrics = board.bounded_metric_names()
    sweeps = ", ".join(sorted({str(r.get("sweep")) for r in board.records}))
    out = [f"# Leaderboard: {sweeps}", "",
           f"Built from {board.record_count} records in `{board.folder / 'records.jsonl'}`; a row per variant (the "
           "method and what differs from its defaults); every row's exact configuration is in its records. Metrics: "
           "value ± standard error. **unified**: mean over tasks of the mean primary metric mapped to [0, 1], higher "
           "better (toxicity inverted). **rank**: by unified score among rows scored on every task and measured like "
           f"the start row; scores less than {TIE_TOLERANCE:g} apart share a rank. **Δ task**: difference of the "
           "task score from the start row on the same items, with a paired-bootstrap 95% interval "
           f"({BOOTSTRAP_SAMPLES} resamples); *not comparable* where the two were measured differently (task config, "
           "evaluation settings, judge) or on other items. Budget: what each run consumed (FLOPs = 6·N·policy tokens + "
           "2·N·reference tokens; online methods count generation, reward- and value-model tokens in policy-"
           "parameter equivalents; gen tokens = tokens they sampled; match ratio = consumed over what the pair "
           "methods consume under budget.match=tokens or flops: policy tokens under tokens).", ""]
    footnotes = board.judge_footnotes()
    if footnotes:  # judges below the better GPT-4-agreement baseline (or unchecked): marked columns, see harness.report.board
        out += [*footnotes, ""]
    # budget columns no run filled (e.g. gen tokens in a sweep without online methods) are left out; the CSV keeps all
    budget_columns = [(name, title) for name, title in CONSUMED_COLUMNS
                      if any(board.consumed(key).get(name) is not None for key in board.keys)]
    for (family, setting), keys in board.groups().items():
        out += [f"## {family} · {setting}", ""]
        header = ["variant", "unified", "rank", *map(board.marked, metrics), *[f"Δ {board.marked(t)}" for t in board.tasks],
                  *[title for _, title in budget_columns], "status"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        start = board.start_key(keys[0])
        for key in keys:
            unified, _ = board.unified(key)
            status, reason = board.status(key)
            cells = [key[2], "—" if unified is None else f"{unified:.4f}", str(ranks.get(key) or "—")]
            cells += [fmt_value(board.metric(key, m)) for m in metrics]
            cells += [fmt_difference(board.paired_difference(key, start, t)) if start not in (None, key) else "—"
                      for t in board.tasks]
            consumed = board.consumed(key)
            cells += [fmt_number(consumed.get(name)) for name, _ in budget_columns]
            cells.append("ok" if status == "ok" else f"{status}: {reason}".replace("|", "\\|"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out += metric_differences_markdown(board, family, setting, keys, start, bounded_metrics)
        shown = [m for m in breakdowns if any(board.metric(key, m) for key in keys)]
        if shown:
            out += [f"### {family} · {setting}: breakdowns", "",
                    "| metric | " + " | ".join(key[2] for key in keys) + " |", "|" + "|".join("---" for _ in range(len(keys) + 1)) + "|"]
            out += ["| " + " | ".join([board.marked(m), *[fmt_value(board.metric(key, m)) for key in keys]]) + " |"
                    for m in shown]
            out.append("")
    out += matrix_markdown(board)
    if board.published:
        out += published_markdown(board.published)
    out += ["![per-task scores](plots/tasks.png)", ""]
    return "\n".join(out)


def metric_differences_markdown(board: Board, family: str, setting: str, keys: list[tuple], start: tuple | None,
                                bounded_metrics: list[str]) -> list[str]:
    """Δ from the start row of every metric in [0, 1] (primary or not, breakdowns included), a row per metric."""
    others = [key for key in keys if key != start and board.unified(key)[0] is not None]  # failed rows have none
    if start is None or not others:
        return []
    rows = []
    for column in bounded_metrics:
        task, name = column.split("/", 1)
        cells = [fmt_difference(board.paired_difference(key, start, task, name)) for key in others]
        if any(cell != "—" for cell in cells):
            rows.append("| " + " | ".join([board.marked(column) + direction(board, keys, column), *cells]) + " |")
    if not rows:
        return []
    return [f"### {family} · {setting}: Δ per metric from start", "",
            "Raw metric (not inverted), paired-bootstrap 95% interval over the same items.", "",
            "| metric | " + " | ".join(key[2] for key in others) + " |", "|" + "|".join("---" for _ in range(len(others) + 1)) + "|",
            *rows, ""]


def matrix_markdown(board: Board) -> list[str]:
    labels, settings, cells = matrix(board)
    out = ["## Unified score: variant × setting", "",
           "| variant | " + " | ".join(settings) + " |", "|" + "|".join("---" for _ in range(len(settings) + 1)) + "|"]
    for label in labels:
        values = [cells.get((label, s)) for s in settings]
        out.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values) + " |")
    return out + [""]


def published_markdown(published: list[dict]) -> list[str]:
    out = ["## Published reference numbers (not measured here)", "",
           "| source | table | model | setting | method | task | metric | value |", "|---|---|---|---|---|---|---|---|"]
    for row in published:
        out.append("| " + " | ".join(str(row.get(k, "")) for k in
                                      ("paper", "table", "model", "setting", "method", "task", "metric", "value")) + " |")
    return out + [""]


def latex(board: Board) -> str:
    """booktabs tables per (family, setting) of the headline metrics (breakdowns are in the CSV); the best value of
    each metric column in bold."""
    metrics = board.metric_names(breakdowns=False)
    out = ["% Generated by align-harness leaderboard; needs \\usepackage{booktabs}"]
    for (family, setting), keys in board.groups().items():
        columns = ["unified", *metrics]
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{escape_latex(family)} · {escape_latex(setting)}: "
                "value $\\pm$ standard error; best in bold.}}", "\\begin{tabular}{l" + "r" * len(columns) + "}",
                "\\toprule", "Variant & " + " & ".join(escape_latex(c) + ("\\textsuperscript{\\dag}" if board.judge_mark(
                    c.split("/", 1)[0]) and c != "unified" else "") for c in columns) + " \\\\", "\\midrule"]
        best: dict[str, float] = {}
        for column in columns:
            values = []
            for key in keys:
                if column == "unified":
                    value, higher = board.unified(key)[0], True
                else:
                    metric = board.metric(key, column)
                    value, higher = (metric["value"], metric["higher_is_better"]) if metric else (None, True)
                if value is not None:
                    values.append(value if higher else -value)
            if values:
                best[column] = max(values)
        for key in keys:
            cells = [escape_latex(key[2])]
            for column in columns:
                if column == "unified":
                    value, stderr, higher = board.unified(key)[0], None, True
                else:
                    metric = board.metric(key, column) or {}
                    value, stderr, higher = metric.get("value"), metric.get("stderr"), metric.get("higher_is_better", True)
                if value is None:
                    cells.append("--")
                    continue
                text = f"{value:.3f}" + (f" $\\pm$ {stderr:.3f}" if stderr is not None else "")
                oriented = value if higher else -value
                cells.append(f"\\textbf{{{text}}}" if column in best and abs(oriented - best[column]) < 1e-12 else text)
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        shown_tasks = dict.fromkeys(c.split("/", 1)[0] for c in metrics)  # judge warnings: \dag on the columns above
        out += ["\\par\\footnotesize \\dag{} " + escape_latex(w) for w in map(board.judge_warning, shown_tasks) if w]
        out += ["\\end{table}", ""]
    return "\n".join(out)


def escape_latex(text: str) -> str:
    replacements = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def csv_text(board: Board) -> str:
    import pandas as pd

    return pd.DataFrame(table_rows(board)).to_csv(index=False, float_format="%.6g")


# ---------------------------------------------------------------------------------------------
# --compare
def compare_text(rows: list[dict]) -> str:
    """The rows of ``compare`` as one table per (family, setting, pair)."""
    lines = [f"A − B: mean paired difference over the same items, percentile-bootstrap 95% interval ({BOOTSTRAP_SAMPLES} "
             "resamples). metric 'score': the task score (primary metrics mapped to [0, 1], higher better); 'unified': "
             "the mean over tasks; other metrics raw."]
    pairs: dict[tuple, list[dict]] = {}
    for row in rows:
        pairs.setdefault((row["family"], row["setting"], row["a"], row["b"]), []).append(row)
    for (family, setting, a, b), members in pairs.items():
        names = [row["metric"] + ("" if row.get("higher_is_better") is None else
                                  f" ({'higher' if row['higher_is_better'] else 'lower'} better)") for row in members]
        task_width = max(4, *(len(row["task"]) for row in members))
        metric_width = max(6, *(len(name) for name in names))
        lines += ["", f"{a} − {b} · {family} · {setting}",
                  f"  {'task':<{task_width}}  {'metric':<{metric_width}}  {'difference':>10}  {'95% interval':>18}  {'items':>5}"]
        for row, name in zip(members, names):
            prefix = f"  {row['task']:<{task_width}}  {name:<{metric_width}}  "
            if "difference" not in row:
                lines.append(prefix + f"{'—':>10}  {row.get('note', '')}")
                continue
            interval = f"[{signed(row['low'], 4)}, {signed(row['high'], 4)}]"
            lines.append(prefix + f"{signed(row['difference'], 4):>10}  {interval:>18}  {row['items']:>5}")
    return "\n".join(lines)


def build_leaderboard(folder: Path) -> dict[str, Path]:
    """Rebuild every leaderboard file of a results folder from its records."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"{folder} is not a folder; pass a results folder, e.g. results/<sweep>")
    if not read_records(folder):
        raise HarnessError(f"{folder} holds no records.jsonl (or it is empty); run a sweep into it first")
    board = Board(folder)
    plots = write_plots(board, folder / "plots")
    outputs = {"markdown": folder / "leaderboard.md", "csv": folder / "leaderboard.csv",
               "latex": folder / "leaderboard.tex", "html": folder / "leaderboard.html"}
    atomic_write_text(outputs["markdown"], markdown(board), point="leaderboard_write")
    atomic_write_text(outputs["csv"], csv_text(board))
    atomic_write_text(outputs["latex"], latex(board))
    atomic_write_text(outputs["html"], html_page(board, plots))
    outputs.update({f"plot {name}": path for name, path in plots.items()})
    return outputs
