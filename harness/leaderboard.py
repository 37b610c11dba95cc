"""The leaderboard: rebuilt from records alone (any folder of them, merged from any machines).

Writes ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.png`` into the results folder.
Rows are (setting, method) with the starting checkpoint first; columns are every task metric
as value ± standard error, then the budget each run consumed.
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import atomic_write_text
from harness.records import latest_records, read_records

CONSUMED_COLUMNS = [
    # (record key, column title)
    ("optimizer_steps", "steps"),
    ("pairs", "pairs"),
    ("policy_tokens", "policy tokens"),
    ("reference_tokens", "ref tokens"),
    ("flops", "FLOPs"),
    ("wall_seconds", "train s"),
    ("peak_memory_mib", "peak MiB"),
]


def leaderboard_frame(records: list[dict]):
    """One row per (setting, method): metrics (value, stderr) and consumed budget, plus status."""
    import pandas as pd

    rows: dict[tuple, dict] = {}
    order: list[tuple] = []
    for record in latest_records(records):
        key = (record.get("family"), record["setting"], record["method"])
        if key not in rows:
            rows[key] = {"family": key[0], "setting": key[1], "method": key[2], "status": "ok", "reason": "",
                         "run_id": record["run_id"]}
            order.append(key)
        row = rows[key]
        if record["status"] != "ok":
            row["status"] = record["status"]
            row["reason"] = record.get("reason") or ""
        for metric, value in (record.get("metrics") or {}).items():
            column = f"{record['task']}/{metric}"
            row[column] = value["value"]
            row[column + " stderr"] = value.get("stderr")
        for key_name, _ in CONSUMED_COLUMNS:
            value = (record.get("consumed") or {}).get(key_name)
            if value is not None:
                row[key_name] = value
    frame = pd.DataFrame([rows[key] for key in order])
    if frame.empty:
        return frame
    frame["_start"] = frame["method"] != "start"
    setting_rank = {"pretrained": 0, "sft": 1, "instruct": 2}
    frame["_setting"] = frame["setting"].map(lambda s: setting_rank.get(s, 9))
    frame = frame.sort_values(["family", "_setting", "_start"], kind="stable").drop(columns=["_start", "_setting"])
    return frame.reset_index(drop=True)


def metric_columns(frame) -> list[str]:
    return [c for c in frame.columns if "/" in c and not c.endswith(" stderr")]


def _value_with_error(value, stderr) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return f"{value:.4f}"
    return f"{value:.4f} ± {stderr:.4f}"


def _humanize(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.1f}"
    value = float(value)
    return f"{value:.3g}" if abs(value) >= 1e6 else f"{int(value)}"


def markdown_table(frame) -> str:
    metrics = metric_columns(frame)
    header = ["family", "setting", "method", *metrics, *[title for _, title in CONSUMED_COLUMNS], "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in frame.iterrows():
        cells = [str(row["family"]), str(row["setting"]), str(row["method"])]
        cells += [_value_with_error(row.get(m), row.get(m + " stderr")) for m in metrics]
        cells += [_humanize(row.get(key)) for key, _ in CONSUMED_COLUMNS]
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        cells.append(status.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(frame, path: Path) -> None:
    """One panel per metric: bars per (setting, method) with ± standard-error whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_columns(frame)
    ok = frame[frame["status"] == "ok"]
    if not metrics or ok.empty:
        figure, axis = plt.subplots(figsize=(5, 2))
        axis.text(0.5, 0.5, "no scored runs yet", ha="center", va="center")
        axis.axis("off")
    else:
        figure, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 0.55 * len(ok) + 2) * len(metrics), 4), squeeze=False)
        labels = [f"{s}\n{m}" for s, m in zip(ok["setting"], ok["method"])]
        colors = ["#888888" if m == "start" else f"C{i % 10}" for i, m in enumerate(ok["method"])]
        for axis, metric in zip(axes[0], metrics):
            errors = ok.get(metric + " stderr")
            axis.bar(range(len(ok)), ok[metric], yerr=None if errors is None else errors.fillna(0), capsize=3, color=colors)
            axis.set_xticks(range(len(ok)), labels, fontsize=8)
            axis.set_title(metric)
            axis.grid(axis="y", alpha=0.3)
        figure.suptitle("grey = starting checkpoint; whiskers = ± 1 standard error", fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def build_leaderboard(folder: Path) -> dict[str, Path]:
    """Rebuild the leaderboard files of a results folder from its records."""
    folder = Path(folder)
    if not folder.exists():
        raise HarnessError(f"{folder} does not exist; pass a results folder, e.g. results/<sweep>")
    records = read_records(folder)
    if not records:
        raise HarnessError(f"{folder} holds no records.jsonl (or it is empty); run a sweep into it first")
    frame = leaderboard_frame(records)
    outputs = {"markdown": folder / "leaderboard.md", "csv": folder / "leaderboard.csv", "plot": folder / "leaderboard.png"}
    sweeps = ", ".join(sorted({str(r.get("sweep")) for r in records}))
    header = (f"# Leaderboard: {sweeps}\n\nEach metric: value ± standard error. Budget columns: what each run consumed "
              f"(FLOPs = 6·N·policy tokens + 2·N·reference tokens). Built from {len(records)} records in "
              f"`{folder / 'records.jsonl'}`; the exact configuration of every row is in its record.\n\n")
    atomic_write_text(outputs["markdown"], header + markdown_table(frame) + "\n![leaderboard](leaderboard.png)\n")
    atomic_write_text(outputs["csv"], frame.to_csv(index=False))
    plot(frame, outputs["plot"])
    return outputs
