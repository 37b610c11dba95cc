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

import json
import math
import random
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.paths import atomic_write_text
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


def matrix(board: Board) -> tuple[list[str], list[str], dict[tuple, float | None]]:
    methods = list(dict.fromkeys(k[2] for k in board.keys))
    settings = list(dict.fromkeys(f"{k[0]} · {k[1]}" for k in board.keys))
    cells = {(k[2], f"{k[0]} · {k[1]}"): board.unified(k)[0] for k in board.keys}
    return methods, settings, cells


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
    from harness.report.plots import write_plots
    from harness.report.html import html_page

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
