"""A self-contained static HTML leaderboard, read top to bottom: the forest plot of each row's difference from its
start row with the legend of the significance mark; a main table that fits a 1400 px page (unified score, rank, one
headline metric per task with the Δ of the task's score and its mark, status; sortable, filters by setting and
method); folded below it every metric, the budget consumed and the breakdowns; the other plots; published numbers
when an experiment carries them; a per-sample viewer of model outputs. A section with nothing to show is left out.
Headers show readable labels (``harness.report.labels``) with the raw key on hover (``title``).

All model text reaches the page as JSON inside ``<script type="application/json">`` with ``<``,
``>`` and ``&`` escaped as ``\\u003c``-style sequences, and is put on screen with ``textContent``
— never parsed as HTML — so an output containing ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from harness.report.board import CONSUMED_COLUMNS, TIE_TOLERANCE, Board
from harness.report.headline import (DIFFERENCE_MIN_SPAN, LEGEND, MARK, difference_colour, forest_rows, headline_metric,
                                     score_metrics)
from harness.report.labels import Labels

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


def signed(value: float) -> str:
    text = f"{value:+.3f}"
    return "+" + text[1:] if float(text) == 0 else text


def difference_cell(difference: dict | None) -> dict:
    """A Δ as a cell part: ``Δ +0.250 [+0.100, +0.400] *``, coloured on the fixed diverging scale when significant."""
    if not difference:
        return {}
    if "difference" not in difference:
        return {"sub": difference.get("note") or "", "subtitle": difference.get("note") or ""}
    text = f"Δ {signed(difference['difference'])} [{signed(difference['low'])}, {signed(difference['high'])}]"
    seeds = f", {difference['seeds']} seeds" if difference.get("seeds") else ""
    out = {"sub": text, "subtitle": f"{difference.get('items')} items{seeds}"}
    if difference.get("significant"):
        out.update({"sub": f"{text} {MARK}", "cls": "significant", "colour": difference_colour(difference["difference"])})
    return out


def value_text(metric: dict | None) -> str:
    """``0.512 ± 0.010``; a row folding several seeds adds the SD over seeds: ``0.512 ± 0.012 (sd 0.020)``."""
    if not metric or metric.get("value") is None:
        return "—"
    value = metric["value"]
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    if metric.get("stderr") is not None and abs(value) < 1000:
        text += f" ± {metric['stderr']:.3f}"
    if metric.get("seed_sd") is not None and (metric.get("seeds") or 0) > 1:
        text += f" (sd {metric['seed_sd']:.3f})"
    return text


def table_data(board: Board, labels: Labels) -> tuple[dict, dict]:
    """The main table and the details table: ``{columns: [{key, label, title}], rows: [{family, setting, method,
    start, cells: {key: {text, sort, title, sub, cls, colour}}}]}``."""
    ranks = board.ranks()
    differences = {(r["family"], r["setting"], r["variant"], r["task"]): r for r in forest_rows(board)}
    headline = [(task, name) for task, name in ((t, headline_metric(board, t)) for t in board.tasks) if name]
    metrics = board.metric_names()
    budget = [(name, title) for name, title in CONSUMED_COLUMNS if any(board.consumed(k).get(name) is not None for k in board.keys)]
    main_columns = [{"key": "variant", "label": "variant", "title": "the method and what differs from its defaults; "
                     "below it the model family · starting setting"},
                    {"key": "unified_score", "label": "unified", "title": "unified_score: mean over tasks of the primary "
                     "metrics mapped to [0, 1], higher better; Δ from the start row below"},
                    {"key": "rank", "label": "rank", "title": "rank"}]
    if board.several_seeds:  # rows folding several seeds (harness.report.board: seeds)
        main_columns.append({"key": "seeds", "label": "seeds", "title": "seeds: training seeds folded into the row; a "
                             "value is their mean ± its standard error (sd = SD over seeds)"})
    for task, name in headline:
        higher = next((m.get("higher_is_better") for m in (board.metric(k, f"{task}/{name}", fill=False) for k in board.keys)
                       if m), True)
        mark = board.judge_mark(task)  # † a task whose judge is below its baselines (the footnote under the table)
        main_columns.append({"key": f"{task}/{name}", "label": labels.metric(task, name) + (f" {mark}" if mark else "")
                             + ("" if higher else " (lower better)"),
                             "title": f"{task}/{name} ({'higher' if higher else 'lower'} better); Δ below: the "
                                      f"{task} task score's ({labels.score(task, score_metrics(board, task))}) "
                                      f"difference from the start row"})
    main_columns.append({"key": "status", "label": "status", "title": "status"})
    details_columns = [{"key": "group", "label": "family · setting", "title": "model family · starting setting"},
                       {"key": "variant", "label": "variant", "title": "variant"}]
    details_columns += [{"key": m, "label": labels.column(m) + (f" {board.judge_mark(m.split('/', 1)[0])}"
                                                             if board.judge_mark(m.split("/", 1)[0]) else ""), "title": m, "breakdown": "/" in m.split("/", 1)[1]} for m in metrics]
    details_columns += [{"key": f"delta {t}", "label": f"Δ {labels.score(t, score_metrics(board, t))}",
                         "title": f"delta {t}"} for t in board.tasks]
    details_columns += [{"key": name, "label": title, "title": name} for name, title in budget]
    details_columns.append({"key": "reason", "label": "status", "title": "status and reason"})
    main_rows, details_rows = [], []
    for key in board.keys:
        family, setting, label = key
        unified = board.unified(key)[0]
        status, reason = board.status(key)
        base = {"family": family, "setting": setting, "method": board.methods[key], "start": board.variants[key] == "start"}
        common = {"group": {"text": f"{family} · {setting}"}, "variant": {"text": label}}
        cells = {"variant": {"text": label, "sub": f"{family} · {setting}", "cls": "name"}, "unified_score": {"text": "—" if unified is None else f"{unified:.3f}", "sort": unified,
                                             **difference_cell(differences.get((*key, "unified")))},
                 "rank": {"text": str(ranks.get(key) or "—"), "sort": ranks.get(key)},
                 "seeds": {"text": str(board.seeds(key)), "sort": board.seeds(key)},
                 "status": {"text": status, "title": reason or status}}
        for task, name in headline:
            metric = board.metric(key, f"{task}/{name}")
            cells[f"{task}/{name}"] = {"text": value_text(metric), "sort": metric.get("value") if metric else None,
                                       **difference_cell(differences.get((*key, task)))}
        main_rows.append({**base, "cells": cells})
        cells = dict(common)
        for column in metrics:
            metric = board.metric(key, column)
            cells[column] = {"text": value_text(metric), "sort": metric.get("value") if metric else None}
        for task in board.tasks:
            part = difference_cell(differences.get((*key, task)))
            cells[f"delta {task}"] = {"text": part.get("sub", "—").removeprefix("Δ "), "cls": part.get("cls"),
                                      "colour": part.get("colour"), "title": part.get("subtitle")}
        consumed = board.consumed(key)
        for name, _ in budget:
            value = consumed.get(name)
            cells[name] = {"text": "—" if value is None else (f"{value:.3g}" if abs(value) >= 1e6 else f"{value:g}"), "sort": value}
        cells["reason"] = {"text": status if status == "ok" else f"{status}: {reason}"}
        details_rows.append({**base, "cells": cells})
    return {"columns": main_columns, "rows": main_rows}, {"columns": details_columns, "rows": details_rows}


def figure(name: str, path: Path, caption: str) -> str:
    return (f'<figure id="{html.escape(name)}"><img alt="{html.escape(caption)}" src="data:image/png;base64,'
            f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>')


PLOT_CAPTIONS = {"tasks": "Headline metrics per row, ± 1 standard error (grey: the start row)",
                 "heatmap": "Unified score: variant × setting (fixed colour scale 0–1)",
                 "win_rate_vs_length": "Win rate against output length", "curves": "Training curves"}


def published_table(published: list[dict]) -> str:
    keys = ["paper", "table", "model", "setting", "method", "task", "metric", "value"]
    head = "".join(f"<th>{key}</th>" for key in keys)
    def cell(row: dict, key: str) -> str:
        if key == "value" and row.get("value") is None:  # a number the study's sources did not give (published.py)
            return f'<td class="text missing" title="{html.escape(str(row.get("missing", "")))}">missing</td>'
        title = f' title="{html.escape(str(row["note"]))}"' if key == "value" and row.get("note") else ""
        return f'<td class="text"{title}>{html.escape(str(row.get(key, "")))}</td>'

    body = "".join("<tr>" + "".join(cell(row, k) for k in keys) + "</tr>" for row in published)
    return f'<table id="published"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_page(board: Board, plots: dict[str, Path]) -> str:
    labels = Labels(board.records)
    main, details = table_data(board, labels)
    title = "Leaderboard: " + ", ".join(sorted({str(r.get("sweep")) for r in board.records}))
    sections = []
    forest = plots.get("forest")
    if forest and forest.exists():
        sections.append('<section id="headline"><h2>Difference from the start row</h2>'
                        + figure("forest", forest, "Each row's difference from its start row per task: mean paired "
                                 "difference and 95 % interval; filled and starred = significant") + "</section>")
    sections.append(MAIN.replace("__LEGEND__", html.escape(LEGEND)).replace("__SPAN__", f"{DIFFERENCE_MIN_SPAN:g}")
                    .replace("__TIE_TOLERANCE__", f"{TIE_TOLERANCE:g}"))
    footnotes = "".join(f'<p class="judge-warning">{html.escape(line)}</p>' for line in board.judge_footnotes())
    if footnotes:  # judges below the better GPT-4-agreement baseline, or unchecked (harness.report.board)
        sections.append(f'<section id="judge-warnings">{footnotes}</section>')
    others = "".join(figure(name, path, PLOT_CAPTIONS.get(name, name)) for name, path in plots.items()
                     if name != "forest" and path.exists())
    if others:
        sections.append(f'<details id="plots" open><summary><h2>Plots</h2></summary>{others}</details>')
    if board.published:
        sections.append('<section id="published-numbers"><h2>Published reference numbers (not measured here)</h2>'
                        + published_table(board.published) + "</section>")
    samples = _samples(board)
    if samples:
        sections.append(SAMPLES)
    data = {"main": main, "details": details, "samples": samples}
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__SECTIONS__", "\n".join(sections))
            .replace("__DATA__", _json_for_script(data)))


MAIN = """<section id="main"><h2>Leaderboard</h2>
<p id="legend"><b>__LEGEND__</b> Δ: difference of the task score (primary metrics mapped to [0, 1], higher better;
toxicity inverted) from the start row on the same items, paired bootstrap 95 % interval; significant cells are tinted
green (gain) or red (loss) on a fixed scale that saturates at ±__SPAN__. Unified score: mean over tasks, higher better.
Rank: scores less than __TIE_TOLERANCE__ apart share one. Hover a header for its raw key; click it to sort.</p>
<div class="controls">
<label>setting <select id="filter-setting"><option value="">all</option></select></label>
<label>method <select id="filter-method"><option value="">all</option></select></label>
</div>
<table id="leaderboard"><thead></thead><tbody></tbody></table>
<details id="all-metrics"><summary>All metrics, Δ per task, budget consumed, status</summary>
<label><input type="checkbox" id="show-breakdowns"> breakdowns (per group, hate / neutral, ...)</label>
<div class="scroll"><table id="details-table"><thead></thead><tbody></tbody></table></div>
</details></section>"""

SAMPLES = """<details id="samples"><summary><h2>Per-sample outputs</h2></summary>
<div id="viewer"><label>run <select id="sample-run"></select></label> <span id="sample-count"></span><div id="sample-list"></div></div>
</details>"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0;font-weight:600}th[data-column=variant]{text-align:left}td.text{text-align:left}
#leaderboard{width:100%;table-layout:auto}#leaderboard th{overflow-wrap:break-word}td.name{white-space:nowrap}
#leaderboard td .sub{display:block;font-size:11px;color:#555;white-space:nowrap}
td.missing{color:#a33;font-style:italic}td.significant{font-weight:600}td.significant .sub{color:#111}
tr.start td{background:#f7f7f7}tr.first td{border-top:2px solid #888}
figure{display:inline-block;margin:0.5em}img{max-width:100%}#forest img{max-width:1300px}
#details-table td,#details-table th{white-space:nowrap}summary h2{display:inline;font-size:1.2em}details{margin:0.8em 0}.scroll{overflow-x:auto;max-width:100%}
#viewer pre{white-space:pre-wrap;background:#fafafa;border:1px solid #ddd;padding:6px;max-height:22em;overflow:auto}
.controls label{margin-right:1em}#legend{max-width:1300px}p.judge-warning{color:#8a4b00;font-size:13px;margin:0.3em 0}
</style></head><body>
<h1>__TITLE__</h1>
__SECTIONS__
<script type="application/json" id="data">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const state = {"leaderboard": {column: null, ascending: true}, "details-table": {column: null, ascending: true}};
function fillSelect(id, values) {
  const select = document.getElementById(id);
  for (const value of values) { const option = document.createElement("option"); option.value = value; option.textContent = value; select.appendChild(option); }
  select.addEventListener("change", renderAll);
}
function render(id, table, hidden) {
  const element = document.getElementById(id), sort = state[id];
  const setting = document.getElementById("filter-setting").value, method = document.getElementById("filter-method").value;
  let rows = table.rows.filter(r => (!setting || r.setting === setting) && (!method || r.method === method));
  if (sort.column !== null) {
    const value = r => { const c = r.cells[sort.column] || {}; return c.sort !== undefined ? c.sort : (c.text === "—" ? null : c.text); };
    rows = rows.slice().sort((a, b) => {
      const x = value(a), y = value(b);
      if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (sort.ascending ? 1 : -1);
    });
  }
  const columns = table.columns.filter(c => !hidden.has(c.key));
  const head = element.tHead; head.textContent = "";
  const headerRow = head.insertRow();
  for (const column of columns) {
    const th = document.createElement("th");
    th.textContent = column.label + (column.key === sort.column ? (sort.ascending ? " ▲" : " ▼") : "");
    th.title = column.title; th.dataset.column = column.key;
    th.addEventListener("click", () => { sort.ascending = sort.column === column.key ? !sort.ascending : true; sort.column = column.key; renderAll(); });
    headerRow.appendChild(th);
  }
  const body = element.tBodies[0]; body.textContent = "";
  let group = null;
  for (const row of rows) {
    const tr = body.insertRow(); const classes = [];
    if (row.start) classes.push("start");
    const name = row.family + " · " + row.setting; if (sort.column === null && name !== group && group !== null) classes.push("first"); group = name;
    tr.className = classes.join(" ");
    for (const column of columns) {
      const td = tr.insertCell(), cell = row.cells[column.key] || {text: "—"};
      const main = document.createElement("span"); main.textContent = cell.text === undefined ? "—" : cell.text; td.appendChild(main);
      if (cell.sub) { const sub = document.createElement("span"); sub.className = "sub"; sub.textContent = cell.sub; td.appendChild(sub); }
      td.title = [column.title, cell.title, cell.subtitle].filter(Boolean).join(" · ");
      if (typeof cell.sort !== "number") td.classList.add("text");
      if (cell.cls) td.classList.add(cell.cls);
      if (cell.colour) td.style.background = cell.colour;
    }
  }
}
function renderAll() {
  render("leaderboard", data.main, new Set());
  const hidden = document.getElementById("show-breakdowns").checked ? new Set() : new Set(data.details.columns.filter(c => c.breakdown).map(c => c.key));
  render("details-table", data.details, hidden);
}
function renderSamples() {
  const select = document.getElementById("sample-run"); if (!select) return;
  data.samples.forEach((group, index) => { const option = document.createElement("option"); option.value = index; option.textContent = group.family + " · " + group.setting + " · " + group.variant + " · " + group.task; select.appendChild(option); });
  const show = () => {
    const list = document.getElementById("sample-list"); list.textContent = "";
    const group = data.samples[Number(select.value)]; if (!group) return;
    document.getElementById("sample-count").textContent = group.samples.length + " samples shown";
    group.samples.forEach(sample => { const pre = document.createElement("pre"); pre.className = "sample"; pre.textContent = JSON.stringify(sample, null, 1); list.appendChild(pre); });
  };
  select.addEventListener("change", show); show();
}
fillSelect("filter-setting", [...new Set(data.main.rows.map(r => r.setting))]);
fillSelect("filter-method", [...new Set(data.main.rows.map(r => r.method))]);
document.getElementById("show-breakdowns").addEventListener("change", renderAll);
renderAll(); renderSamples();
</script></body></html>
"""
