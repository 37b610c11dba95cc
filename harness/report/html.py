"""A self-contained static HTML leaderboard: sortable table, filters by setting and method, the
plots inline, and a per-sample viewer of model outputs.

All model text reaches the page as JSON inside ``<script type="application/json">`` with ``<``,
``>`` and ``&`` escaped as ``\\u003c``-style sequences, and is put on screen with ``textContent``
— never parsed as HTML — so an output containing ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from harness.report.board import TIE_TOLERANCE, table_rows

SAMPLES_PER_RUN = 50   # samples per (run, task) embedded in the page; the full files stay beside the records


def _json_for_script(value) -> str:
    return (json.dumps(value, ensure_ascii=False, default=str)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _samples(board) -> list[dict]:
    out = []
    for key in board.keys:
        for record in board.by_key(key):
            path = board.folder / (record.get("samples_file") or "")
            if record.get("samples_file") and path.exists():
                lines = path.read_text(encoding="utf-8").splitlines()[:SAMPLES_PER_RUN]
                out.append({"setting": record["setting"], "variant": key[2], "task": record["task"],
                            "family": record.get("family"), "samples": [json.loads(line) for line in lines]})
    return out


def html_page(board, plots: dict[str, Path]) -> str:
    rows = table_rows(board)
    metrics = board.metric_names()
    columns = ["family", "setting", "variant", "unified_score", "rank", *metrics,
               *[f"delta {t}" for t in board.tasks], "optimizer_steps", "policy_tokens", "flops", "wall_seconds", "status"]
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, path in plots.items() if path.exists())
    title = "Leaderboard: " + ", ".join(sorted({str(r.get("sweep")) for r in board.records}))
    breakdowns = [m for m in metrics if m not in board.metric_names(breakdowns=False)]  # hidden until asked for
    judge_marks = {c: board.judge_mark(c.split(" ", 1)[1] if c.startswith("delta ") else c.split("/", 1)[0])
                   for c in columns}  # † on the columns of a task whose judge is below baseline (harness.report.board)
    data = {"columns": columns, "breakdowns": breakdowns, "rows": rows, "samples": _samples(board),
            "published": board.published, "judge_marks": {c: mark for c, mark in judge_marks.items() if mark}}
    footnotes = "".join(f'<p class="judge-warning">{html.escape(line)}</p>' for line in board.judge_footnotes())
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__JUDGE_WARNINGS__", footnotes).replace("__TIE_TOLERANCE__", f"{TIE_TOLERANCE:g}").replace("__IMAGES__", images).replace(
        "__DATA__", _json_for_script(data))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}td.text{text-align:left}
tr.start td{background:#f7f7f7}figure{display:inline-block;margin:0.5em}img{max-width:640px}
#viewer pre{white-space:pre-wrap;background:#fafafa;border:1px solid #ddd;padding:6px;max-height:22em;overflow:auto}
.controls label{margin-right:1em}p.judge-warning{color:#8a4b00;font-size:13px;margin:0.3em 0}
</style></head><body>
<h1>__TITLE__</h1>
<p>Metrics: value ± standard error. Unified score: mean over tasks of primary metrics mapped to [0, 1], higher better.
A row per variant (method and what differs from its defaults). Rank: scores less than __TIE_TOLERANCE__ apart share one.
Δ: task-score difference from the start row on the same items (paired bootstrap 95% interval), or why the two are
not comparable (measured differently, other items). Click a column header to sort.</p>
<div class="controls">
<label>setting <select id="filter-setting"><option value="">all</option></select></label>
<label>method <select id="filter-method"><option value="">all</option></select></label>
<label><input type="checkbox" id="show-breakdowns"> breakdowns (per group, hate / neutral, ...)</label>
</div>
<table id="leaderboard"><thead></thead><tbody></tbody></table>
__JUDGE_WARNINGS__
<h2>Published reference numbers</h2><table id="published"><thead></thead><tbody></tbody></table>
<h2>Plots</h2>__IMAGES__
<h2>Per-sample outputs</h2>
<div id="viewer"><label>run <select id="sample-run"></select></label> <span id="sample-count"></span><div id="sample-list"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const table = document.getElementById("leaderboard");
let sortColumn = null, sortAscending = true;
function signed(x) { const s = x.toFixed(3); return /^-0\\.0+$/.test(s) ? "+" + s.slice(1) : (s.startsWith("-") ? s : "+" + s); }
function cell(row, column) {
  const value = row[column];
  if (value === null || value === undefined) return row[column + " note"] || "—";
  if (typeof value === "number") {
    const error = row[column + " stderr"], low = row[column + " low"], high = row[column + " high"];
    if (error !== undefined && error !== null) return value.toFixed(4) + " ± " + error.toFixed(4);
    if (low !== undefined && low !== null) return signed(value) + " [" + signed(low) + ", " + signed(high) + "]";
    return Math.abs(value) >= 1e6 ? value.toExponential(2) : (Number.isInteger(value) ? String(value) : value.toFixed(4));
  }
  return String(value);
}
function fillSelect(id, values) {
  const select = document.getElementById(id);
  for (const value of values) { const option = document.createElement("option"); option.value = value; option.textContent = value; select.appendChild(option); }
  select.addEventListener("change", render);
}
function render() {
  const setting = document.getElementById("filter-setting").value, method = document.getElementById("filter-method").value;
  let rows = data.rows.filter(r => (!setting || r.setting === setting) && (!method || r.method === method));
  if (sortColumn !== null) {
    rows = rows.slice().sort((a, b) => {
      const x = a[sortColumn], y = b[sortColumn];
      if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (sortAscending ? 1 : -1);
    });
  }
  const hidden = document.getElementById("show-breakdowns").checked ? new Set() : new Set(data.breakdowns);
  const columns = data.columns.filter(c => !hidden.has(c));
  const head = table.tHead; head.textContent = "";
  const headerRow = head.insertRow();
  for (const column of columns) {
    const th = document.createElement("th"); th.textContent = column + (data.judge_marks[column] ? " " + data.judge_marks[column] : "") + (column === sortColumn ? (sortAscending ? " ▲" : " ▼") : "");
    th.dataset.column = column;
    th.addEventListener("click", () => { sortAscending = sortColumn === column ? !sortAscending : true; sortColumn = column; render(); });
    headerRow.appendChild(th);
  }
  const body = table.tBodies[0]; body.textContent = "";
  for (const row of rows) {
    const tr = body.insertRow(); if (row.method === "start") tr.className = "start";
    for (const column of columns) { const td = tr.insertCell(); td.textContent = cell(row, column); if (typeof row[column] !== "number") td.className = "text"; }
  }
}
function renderPublished() {
  const published = document.getElementById("published");
  const keys = ["paper", "table", "model", "setting", "method", "task", "metric", "value"];
  const headerRow = published.tHead.insertRow();
  for (const key of keys) { const th = document.createElement("th"); th.textContent = key; headerRow.appendChild(th); }
  for (const row of data.published) { const tr = published.tBodies[0].insertRow(); for (const key of keys) { const td = tr.insertCell(); td.textContent = row[key] === undefined ? "" : String(row[key]); td.className = "text"; } }
  if (!data.published.length) { const tr = published.tBodies[0].insertRow(); const td = tr.insertCell(); td.textContent = "none for this sweep"; }
}
function renderSamples() {
  const select = document.getElementById("sample-run");
  data.samples.forEach((group, index) => { const option = document.createElement("option"); option.value = index; option.textContent = group.setting + " · " + group.variant + " · " + group.task; select.appendChild(option); });
  const show = () => {
    const list = document.getElementById("sample-list"); list.textContent = "";
    const group = data.samples[Number(select.value)]; if (!group) return;
    document.getElementById("sample-count").textContent = group.samples.length + " samples shown";
    group.samples.forEach(sample => { const pre = document.createElement("pre"); pre.className = "sample"; pre.textContent = JSON.stringify(sample, null, 1); list.appendChild(pre); });
  };
  select.addEventListener("change", show); show();
}
fillSelect("filter-setting", [...new Set(data.rows.map(r => r.setting))]);
fillSelect("filter-method", [...new Set(data.rows.map(r => r.method))]);
document.getElementById("show-breakdowns").addEventListener("change", render);
render(); renderPublished(); renderSamples();
</script></body></html>
"""
