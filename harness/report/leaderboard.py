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
from harness.report.headline import LEGEND, LEGEND_TEXT, MARK, headline_metric, score_metrics, significant
from harness.report.html import html_page
from harness.report.labels import Labels
from harness.report.plots import write_plots
from harness.report.published import published_markdown

# Board, compare and paired_bootstrap live in harness.report.board; importers may take them from here too
__all__ = ["Board", "build_leaderboard", "compare", "compare_text", "csv_text", "latex", "markdown", "paired_bootstrap"]


# ---------------------------------------------------------------------------------------------
# formatting
def judged(board: Board, column: str) -> str:
    """`` †`` after a column (``task/metric`` or a task) whose task's judge is below its baselines or unchecked
    (``Board.judge_warning``; the footnote says which), else ``""``."""
    mark = board.judge_mark(column.split("/", 1)[0])
    return f" {mark}" if mark else ""


def fmt_value(metric: dict | None) -> str:
    """``0.5000 ± 0.0100``; a mean over seeds adds its spread: ``0.5000 ± 0.0100 (sd 0.0200)``."""
    if not metric or metric.get("value") is None:
        return "—"
    spread = f" (sd {metric['seed_sd']:.4f})" if metric.get("seed_sd") is not None else ""
    if metric.get("stderr") is None:
        return f"{metric['value']:.4f}{spread}"
    return f"{metric['value']:.4f} ± {metric['stderr']:.4f}{spread}"


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
def marked(difference: dict | None, digits: int = 3) -> str:
    """``fmt_difference`` with ``MARK`` after a significant difference (its 95% interval excludes 0)."""
    return fmt_difference(difference, digits) + (f" {MARK}" if significant(difference) else "")


def markdown(board: Board, plots: dict[str, Path] | None = None) -> str:
    """The forest plot first; per (family, setting) a main table that fits a page — unified score, rank, one headline
    metric per task and the Δ of each task's score with its mark, status —; the rest folded below it (all metrics,
    budget consumed, Δ per metric, breakdowns). Sections with nothing to show are left out. The CSV has every
    column in one table, under raw keys."""
    labels = Labels(board.records)
    ranks = board.ranks()
    headline = {task: headline_metric(board, task) for task in board.tasks}
    metrics = board.metric_names(breakdowns=False)
    breakdowns = [m for m in board.metric_names() if m not in metrics]
    bounded_metrics = board.bounded_metric_names()
    plots = plots or {}
    sweeps = ", ".join(sorted({str(r.get("sweep")) for r in board.records}))
    out = [f"# Leaderboard: {sweeps}", "",
           f"Built from {board.record_count} records in `{board.folder / 'records.jsonl'}`; a row per variant (the "
           "method and what differs from its defaults); every row's exact configuration is in its records. Metrics: "
           "value ± standard error. **unified**: mean over tasks of the mean primary metric mapped to [0, 1], higher "
           "better (toxicity inverted). **rank**: by unified score among rows scored on every task and measured like "
           f"the start row; scores less than {TIE_TOLERANCE:g} apart share a rank. **Δ task**: difference of the "
           "task score (primary metrics mapped to [0, 1], higher better) from the start row on the same items, with a "
           f"paired-bootstrap 95% interval ({BOOTSTRAP_SAMPLES} resamples); *not comparable* where the two were "
           "measured differently (task config, evaluation settings, judge) or on other items.", "",
           f"`{MARK}` = {LEGEND_TEXT}", ""]   # in backticks: a bare * opening a line would start a list
    if board.several_seeds:
        out[-4] += (" **Seeds**: a row folds the seeds of one variant (`seeds` column): a metric is the mean over "
                    "seeds ± its standard error (items and seeds) with the SD over seeds (sd); a Δ is the mean over "
                    "seeds of the paired item difference, its interval from resampling seeds, then items "
                    "(harness.report.board).")
    if "forest" in plots:
        out += ["![Difference of each row from its start row per task, 95% intervals](plots/forest.png)", ""]
    shown_headline = [f"{task}/{name}" for task, name in headline.items() if name]
    if shown_headline:
        out += ["Columns: " + "; ".join(f"{labels.column(c)} = `{c}`" for c in shown_headline) + ".", ""]
    footnotes = board.judge_footnotes()
    if footnotes:  # judges below the better GPT-4-agreement baseline (or unchecked): marked columns (harness.report.board)
        out += [*footnotes, ""]
    # budget columns no run filled (e.g. gen tokens in a sweep without online methods) are left out; the CSV keeps all
    budget_columns = [(name, title) for name, title in CONSUMED_COLUMNS
                      if any(board.consumed(key).get(name) is not None for key in board.keys)]
    for (family, setting), keys in board.groups().items():
        start = board.start_key(keys[0])
        compared = [key for key in keys if start not in (None, key)]
        out += [f"## {family} · {setting}", ""]
        outcomes = {board.status(key) for key in keys}
        if len(outcomes) == 1 and next(iter(outcomes))[0] != "ok":  # every row skipped (or failed) the same way
            status, reason = next(iter(outcomes))
            out += [f"Every row ({', '.join(key[2] for key in keys)}) {status}: {reason}", ""]
            continue
        seeds = ["seeds"] if board.several_seeds else []
        header = ["variant", "unified", "rank", *seeds,
                  *[labels.column(c) + judged(board, c) + direction(board, keys, c) for c in shown_headline],
                  *([f"Δ {labels.score(t, score_metrics(board, t))}{judged(board, t)}" for t in board.tasks]
                    if compared else []), "status"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for key in keys:
            unified, _ = board.unified(key)
            status, reason = board.status(key)
            cells = [key[2], "—" if unified is None else f"{unified:.4f}", str(ranks.get(key) or "—")]
            cells += [str(board.seeds(key))] if seeds else []
            cells += [fmt_value(board.metric(key, c)) for c in shown_headline]
            if compared:
                cells += [marked(board.paired_difference(key, start, t)) if key in compared else "—" for t in board.tasks]
            cells.append("ok" if status == "ok" else f"{status}: {reason}".replace("|", "\\|"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        shown = [m for m in breakdowns if any(board.metric(key, m) for key in keys)]
        breakdown_lines = []
        if shown:
            breakdown_lines = ["### Breakdowns", "", "| metric | " + " | ".join(key[2] for key in keys) + " |",
                               "|" + "|".join("---" for _ in range(len(keys) + 1)) + "|",
                               *["| " + " | ".join([labels.column(m) + judged(board, m), *[fmt_value(board.metric(key, m)) for key in keys]]) + " |"
                                 for m in shown], ""]
        parts = [("all metrics", all_metrics_markdown(board, labels, keys, metrics)),
                 ("budget", budget_markdown(board, keys, budget_columns)),
                 ("Δ per metric", metric_differences_markdown(board, labels, keys, start, bounded_metrics)),
                 ("breakdowns", breakdown_lines)]
        parts = [(name, lines) for name, lines in parts if lines]   # a part with nothing to show is left out
        if parts:
            out += [f"<details><summary>{family} · {setting}: {', '.join(name for name, _ in parts)}</summary>", "",
                    *[line for _, lines in parts for line in lines], "</details>", ""]
    if len(board.groups()) > 1:
        out += matrix_markdown(board)
        if "heatmap" in plots:
            out += ["![unified score: variant × setting, fixed 0–1 colour scale](plots/heatmap.png)", ""]
    if board.published:
        out += published_markdown(board.published)
    if "tasks" in plots:
        out += ["![per-task scores](plots/tasks.png)", ""]
    return "\n".join(out)


def all_metrics_markdown(board: Board, labels: Labels, keys: list[tuple], metrics: list[str]) -> list[str]:
    """Every headline metric ± standard error, a row per metric (its raw key beside its label)."""
    shown = [m for m in metrics if any(board.metric(key, m) for key in keys)]
    if not shown:
        return []
    return ["### All metrics", "", "| metric | key | " + " | ".join(key[2] for key in keys) + " |",
            "|" + "|".join("---" for _ in range(len(keys) + 2)) + "|",
            *["| " + " | ".join([labels.column(m) + direction(board, keys, m), f"`{m}`",
                                 *[fmt_value(board.metric(key, m)) for key in keys]]) + " |" for m in shown], ""]


def budget_markdown(board: Board, keys: list[tuple], budget_columns: list[tuple]) -> list[str]:
    """What each trained row consumed; nothing when no row of the group trained."""
    trained = [key for key in keys if board.consumed(key)]
    if not trained or not budget_columns:
        return []
    out = ["### Budget consumed", "",
           "FLOPs = 6·N·policy tokens + 2·N·reference tokens; online methods count generation, reward- and value-model "
           "tokens in policy-parameter equivalents; gen tokens = tokens they sampled; match ratio = consumed over what "
           "the pair methods consume under budget.match=tokens or flops.", "",
           "| variant | " + " | ".join(title for _, title in budget_columns) + " |",
           "|" + "|".join("---" for _ in range(len(budget_columns) + 1)) + "|"]
    for key in trained:
        consumed = board.consumed(key)
        out.append("| " + " | ".join([key[2], *[fmt_number(consumed.get(name)) for name, _ in budget_columns]]) + " |")
    return out + [""]


def metric_differences_markdown(board: Board, labels: Labels, keys: list[tuple], start: tuple | None,
                                bounded_metrics: list[str]) -> list[str]:
    """Δ from the start row of every metric in [0, 1] (primary or not, breakdowns included), a row per metric."""
    others = [key for key in keys if key != start and board.unified(key)[0] is not None]  # failed rows have none
    if start is None or not others:
        return []
    rows = []
    for column in bounded_metrics:
        task, name = column.split("/", 1)
        cells = [marked(board.paired_difference(key, start, task, name)) for key in others]
        if any(cell != "—" for cell in cells):
            rows.append("| " + " | ".join([labels.column(column) + judged(board, column) + direction(board, keys, column), *cells]) + " |")
    if not rows:
        return []
    return ["### Δ per metric from start", "",
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


def latex(board: Board) -> str:
    """booktabs tables per (family, setting) of the headline metrics under their labels (breakdowns are in the CSV);
    the best value of each metric column in bold; ``MARK`` after a value whose difference from the start row is
    significant (its paired 95% interval excludes 0)."""
    labels = Labels(board.records)
    metrics = board.metric_names(breakdowns=False)
    out = ["% Generated by align-harness leaderboard; needs \\usepackage{booktabs}"]
    for (family, setting), keys in board.groups().items():
        columns = ["unified", *metrics]
        start = board.start_key(keys[0])
        legend = " " + escape_latex(LEGEND).replace(escape_latex(MARK), f"\\textsuperscript{{{MARK}}}", 1) if start else ""
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{escape_latex(family)} · {escape_latex(setting)}: "
                f"value $\\pm$ standard error; best in bold.{legend}}}", "\\begin{tabular}{l" + "r" * len(columns) + "}",
                "\\toprule", "Variant & " + " & ".join("Unified score" if c == "unified" else escape_latex(labels.column(c)) + ("\\textsuperscript{\\dag}" if c != "unified" and board.judge_mark(c.split("/", 1)[0]) else "")
                                                       for c in columns) + " \\\\", "\\midrule"]
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
                    difference = board.unified_difference(key, start) if start not in (None, key) else None
                else:
                    metric = board.metric(key, column) or {}
                    value, stderr, higher = metric.get("value"), metric.get("stderr"), metric.get("higher_is_better", True)
                    task, name = column.split("/", 1)
                    difference = board.paired_difference(key, start, task, name) if start not in (None, key) else None
                if value is None:
                    cells.append("--")
                    continue
                text = f"{value:.3f}" + (f" $\\pm$ {stderr:.3f}" if stderr is not None else "")
                oriented = value if higher else -value
                text = f"\\textbf{{{text}}}" if column in best and abs(oriented - best[column]) < 1e-12 else text
                cells.append(text + (f"\\textsuperscript{{{MARK}}}" if significant(difference) else ""))
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
    """Every number of ``table_rows`` unrounded, under raw keys (the CSV is for machines; labels are in the other
    formats); after each difference's ``note`` its ``significant`` column: True when its 95% interval excludes 0,
    False when it does not, empty without an interval."""
    import pandas as pd

    rows = []
    for row in table_rows(board):
        out = {}
        for column, value in row.items():
            out[column] = value
            if column.startswith("delta ") and column.endswith(" note"):
                base = column[:-len(" note")]
                out[f"{base} significant"] = significant({"low": row.get(f"{base} low"), "high": row.get(f"{base} high")})
        rows.append(out)
    return pd.DataFrame(rows).to_csv(index=False, float_format="%.6g")


# ---------------------------------------------------------------------------------------------
# --compare
def compare_text(rows: list[dict]) -> str:
    """The rows of ``compare`` as one table per (family, setting, pair)."""
    lines = [f"A − B: mean paired difference over the same items, percentile-bootstrap 95% interval ({BOOTSTRAP_SAMPLES} "
             "resamples; a row of several seeds: the mean over its seeds, seeds resampled, then items). metric "
             "'score': the task score (primary metrics mapped to [0, 1], higher better); 'unified': "
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
            spread = "" if (row.get("seeds") or 1) == 1 else (
                f"  {row['seeds']} seeds" + (f", sd {row['seed_sd']:.4f}" if row.get("seed_sd") is not None else ""))
            lines.append(prefix + f"{signed(row['difference'], 4):>10}  {interval:>18}  {row['items']:>5}{spread}")
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
    atomic_write_text(outputs["markdown"], markdown(board, plots), point="leaderboard_write")
    atomic_write_text(outputs["csv"], csv_text(board))
    atomic_write_text(outputs["latex"], latex(board))
    atomic_write_text(outputs["html"], html_page(board, plots))
    outputs.update({f"plot {name}": path for name, path in plots.items()})
    return outputs
