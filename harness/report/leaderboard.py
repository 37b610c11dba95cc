"""The leaderboard: rebuilt from records alone (any folder of them, merged from any machines).

``build_leaderboard(folder)`` writes into ``folder``:

* ``leaderboard.md`` — per (family, setting): rows = the starting checkpoint and every method;
  columns = every task metric ± standard error, the unified alignment score with its rank, the
  alignment tax or gain per task (difference from the starting checkpoint, paired bootstrap 95%
  interval over the same items) and the budget consumed; then the method × setting matrix of the
  unified score, and published reference rows where an experiment config carries them;
* ``leaderboard.csv`` — one row per (family, setting, method): every number above, unrounded;
* ``leaderboard.tex`` — booktabs tables, best value per column in bold;
* ``leaderboard.html`` — one self-contained page (``harness.report.html``);
* ``plots/*.png`` and ``plots/*.svg`` (``harness.report.plots``).

**Unified alignment score.** Each task's *primary* metrics (the task config's ``primary_metrics``;
by default every metric whose values lie in [0, 1] and whose name has no ``/`` breakdown) are mapped
to [0, 1] with higher better — ``v`` when higher is better, ``1 − v`` otherwise (toxicity) —; a task's
score is the mean of its mapped primary metrics; the unified score is the mean over the tasks the
row was scored on. Rows scored on fewer tasks than the most complete row are not ranked.
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.paths import atomic_write_text
from harness.records import read_records
from harness.report.board import (BOOTSTRAP_SAMPLES, CONSUMED_COLUMNS, Board, matrix, paired_bootstrap,  # noqa: F401
                                  table_rows)
from harness.report.html import html_page
from harness.report.plots import write_plots


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


def fmt_difference(difference: dict | None) -> str:
    if not difference:
        return "—"
    return f"{difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"


def markdown(board: Board) -> str:
    """Per (family, setting): a table of headline metrics, Δ, budget; then each task's breakdowns (per group,
    hate / neutral, ...) transposed, a row per breakdown. The CSV has every column in one table."""
    ranks = board.ranks()
    metrics = board.metric_names(breakdowns=False)
    breakdowns = [m for m in board.metric_names() if m not in metrics]
    sweeps = ", ".join(sorted({str(r.get("sweep")) for r in board.records}))
    out = [f"# Leaderboard: {sweeps}", "",
           f"Built from {board.record_count} records in `{board.folder / 'records.jsonl'}`; every row's exact "
           "configuration is in its records. Metrics: value ± standard error. **unified**: mean over tasks of the "
           "mean primary metric mapped to [0, 1], higher better (toxicity inverted). **Δ task**: difference of the "
           "task score from the starting checkpoint on the same items, with a paired-bootstrap 95% interval "
           f"({BOOTSTRAP_SAMPLES} resamples). Budget: what each run consumed (FLOPs = 6·N·policy tokens + "
           "2·N·reference tokens; online methods count generation, reward- and value-model tokens in policy-"
           "parameter equivalents; gen tokens = tokens they sampled; match ratio = consumed over what the pair "
           "methods consume under budget.match=tokens or flops: policy tokens under tokens).", ""]
    groups: dict[tuple, list[tuple]] = {}
    for key in board.keys:
        groups.setdefault(key[:2], []).append(key)
    # budget columns no run filled (e.g. gen tokens in a sweep without online methods) are left out; the CSV keeps all
    budget_columns = [(name, title) for name, title in CONSUMED_COLUMNS
                      if any(board.consumed(key).get(name) is not None for key in board.keys)]
    for (family, setting), keys in groups.items():
        out += [f"## {family} · {setting}", ""]
        header = ["method", "unified", "rank", *metrics, *[f"Δ {t}" for t in board.tasks],
                  *[title for _, title in budget_columns], "status"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for key in keys:
            unified, _ = board.unified(key)
            status, reason = board.status(key)
            start = (family, setting, "start")
            cells = [key[2], "—" if unified is None else f"{unified:.4f}", str(ranks.get(key) or "—")]
            cells += [fmt_value(board.metric(key, m)) for m in metrics]
            cells += [fmt_difference(board.paired_difference(key, start, t)) if key[2] != "start" and start in keys else "—"
                      for t in board.tasks]
            consumed = board.consumed(key)
            cells += [fmt_number(consumed.get(name)) for name, _ in budget_columns]
            cells.append("ok" if status == "ok" else f"{status}: {reason}".replace("|", "\\|"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        shown = [m for m in breakdowns if any(board.metric(key, m) for key in keys)]
        if shown:
            out += [f"### {family} · {setting}: breakdowns", "",
                    "| metric | " + " | ".join(key[2] for key in keys) + " |", "|" + "|".join("---" for _ in range(len(keys) + 1)) + "|"]
            out += ["| " + " | ".join([m, *[fmt_value(board.metric(key, m)) for key in keys]]) + " |" for m in shown]
            out.append("")
    out += matrix_markdown(board)
    if board.published:
        out += published_markdown(board.published)
    out += ["![per-task scores](plots/tasks.png)", ""]
    return "\n".join(out)


def matrix_markdown(board: Board) -> list[str]:
    methods, settings, cells = matrix(board)
    out = ["## Unified score: method × setting", "",
           "| method | " + " | ".join(settings) + " |", "|" + "|".join("---" for _ in range(len(settings) + 1)) + "|"]
    for method in methods:
        values = [cells.get((method, s)) for s in settings]
        out.append(f"| {method} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values) + " |")
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
    groups: dict[tuple, list[tuple]] = {}
    for key in board.keys:
        groups.setdefault(key[:2], []).append(key)
    out = ["% Generated by align-harness leaderboard; needs \\usepackage{booktabs}"]
    for (family, setting), keys in groups.items():
        columns = ["unified", *metrics]
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{escape_latex(family)} · {escape_latex(setting)}: "
                "value $\\pm$ standard error; best in bold.}}", "\\begin{tabular}{l" + "r" * len(columns) + "}",
                "\\toprule", "Method & " + " & ".join(escape_latex(c) for c in columns) + " \\\\", "\\midrule"]
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
                signed = value if higher else -value
                cells.append(f"\\textbf{{{text}}}" if column in best and abs(signed - best[column]) < 1e-12 else text)
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def escape_latex(text: str) -> str:
    replacements = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def csv_text(board: Board) -> str:
    import pandas as pd

    return pd.DataFrame(table_rows(board)).to_csv(index=False, float_format="%.6g")


def compare(board: Board, method_a: str, method_b: str) -> list[dict]:
    """Paired-bootstrap differences ``method_a − method_b`` per task, in every (family, setting) with both."""
    rows = []
    for key in board.keys:
        if key[2] != method_a:
            continue
        other = (key[0], key[1], method_b)
        if other not in board.keys:
            continue
        for task in board.tasks:
            difference = board.paired_difference(key, other, task)
            rows.append({"family": key[0], "setting": key[1], "task": task, **(difference or {})})
    if not rows:
        methods = sorted({k[2] for k in board.keys})
        raise HarnessError(f"no setting has both {method_a!r} and {method_b!r}; methods here: {', '.join(methods)}")
    return rows


def compare_text(rows: list[dict], method_a: str, method_b: str) -> str:
    lines = [f"{method_a} − {method_b}: task-score difference on the same items, paired bootstrap 95% interval",
             f"{'family':<16} {'setting':<10} {'task':<22} {'difference':>11} {'95% interval':>20} {'items':>6}"]
    for row in rows:
        if "difference" not in row:
            lines.append(f"{row['family']:<16} {row['setting']:<10} {row['task']:<22} {'—':>11}")
            continue
        interval = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        lines.append(f"{row['family']:<16} {row['setting']:<10} {row['task']:<22} {row['difference']:>+11.4f} "
                     f"{interval:>20} {row['items']:>6}")
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
    atomic_write_text(outputs["markdown"], markdown(board))
    atomic_write_text(outputs["csv"], csv_text(board))
    atomic_write_text(outputs["latex"], latex(board))
    atomic_write_text(outputs["html"], html_page(board, plots))
    outputs.update({f"plot {name}": path for name, path in plots.items()})
    return outputs
