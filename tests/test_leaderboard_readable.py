"""A leaderboard read at a glance (issue 14, item 7): readable metric labels with the raw key kept where machines
read, the significance mark in every format, anchored colour scales, the forest plot's data, empty sections left
out, and the page in headless Chromium at 1400 px (no sideways scroll, forest plot first, raw keys on hover).

The realistic board: ``realistic_records`` writes what a mini-study's sweep would — two families, three
settings, seven methods, the five suite tasks with their real configs (``display`` labels included) — with
per-item scores drawn from a seeded generator, some rows clearly moved, most tied with their start row.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest

from harness.records import append_record, write_samples
from harness.report.board import START, Board
from harness.report.headline import (DIFFERENCE_MIN_SPAN, LEGEND, LEGEND_TEXT, MARK, SCORE_SCALE, difference_colour,
                                     difference_span, forest_rows, headline_metric, significant)
from harness.report.labels import Labels, prettify
from harness.report.board import matrix
from harness.report.leaderboard import build_leaderboard, csv_text, latex, markdown
from harness.report.plots import heatmap, heatmap_columns

TASK_ITEMS = {"heldout_preference": 64, "truthfulqa_mc": 24, "toxicity": 62, "win_rate": 16, "gsm8k": 4}
GROUPS = ["women", "asian", "black", "jewish", "muslim", "lgbtq"]
METHODS = ["dpo", "ipo", "kto", "simpo", "cpo", "orpo"]
# method -> per-task shift of the item success probability (large ones come out significant)
EFFECTS = {"dpo": {"heldout_preference": 0.35, "truthfulqa_mc": 0.0}, "simpo": {"heldout_preference": 0.45, "toxicity": -0.3},
           "ipo": {"heldout_preference": -0.3}, "kto": {}, "cpo": {"truthfulqa_mc": 0.05}, "orpo": {"win_rate": 0.1}}


def task_config(task: str) -> dict:
    from omegaconf import OmegaConf

    from harness.run.registry import group_config

    return OmegaConf.to_container(group_config("task", task), resolve=True)


def item_values(rng: random.Random, start: list[float], shift: float) -> list[float]:
    """The start row's per-item 0/1 outcomes, each moved towards 1 (shift > 0) or 0 with probability |shift|."""
    out = []
    for value in start:
        if rng.random() < abs(shift):
            value = 1.0 if shift > 0 else 0.0
        out.append(value)
    return out


def task_samples(task: str, rng: random.Random, base: dict, shift: float) -> list[dict]:
    """Per-item scores of one row on ``task`` (``base``: the start row's per-item draws, shared by its group)."""
    n = TASK_ITEMS[task]
    if task == "heldout_preference":
        avg = item_values(rng, base["avg"], shift)
        logratio = item_values(rng, base["logratio"], shift)
        return [{"item_id": f"h{i}", "scores": {"avg_logp_accuracy": avg[i], "logratio_accuracy": logratio[i]}} for i in range(n)]
    if task == "truthfulqa_mc":
        mc1 = item_values(rng, base["mc1"], shift)
        return ([{"item_id": f"q{i}", "scores": {"mc1": mc1[i]}} for i in range(n)]
                + [{"item_id": f"q{i}-2", "scores": {"mc2": min(1.0, max(0.0, base["mc2"][i] + shift * rng.random()))}}
                   for i in range(n)])
    if task == "toxicity":
        toxic = item_values(rng, base["toxic"], shift)
        samples = []
        for i in range(n):
            keys = ["", "/hate" if i % 2 else "/neutral", f"/group={GROUPS[i % len(GROUPS)]}"]
            score = min(1.0, max(0.0, 0.3 * toxic[i] + 0.4 * base["toxic"][i] + 0.1 * rng.random()))
            samples.append({"item_id": f"p{i}", "continuation": f"continuation {i}",
                            "scores": {**{f"toxic_share{k}": toxic[i] for k in keys}, **{f"mean_score{k}": score for k in keys}}})
        return samples
    if task == "win_rate":
        wins = item_values(rng, base["win"], shift)
        return [{"item_id": f"w{i}", "output": "<b>an answer</b>" if i == 0 else f"answer {i}",
                 "scores": {"win_rate": wins[i], "length_controlled_win_rate": wins[i] * 0.9 + 0.05,
                            "mean_output_chars": 200.0 + 40 * wins[i], "mean_reference_chars": 210.0}} for i in range(n)]
    flexible = item_values(rng, base["gsm"], shift)
    return [{"item_id": f"g{i}", "scores": {"exact_match_flexible": flexible[i], "exact_match_strict": flexible[i] * (i % 2)}}
            for i in range(n)]


def metrics_of(samples: list[dict], task: str) -> dict:
    lower = {"toxicity": True, "win_rate": None}
    names = list(dict.fromkeys(name for sample in samples for name in sample["scores"]))
    out = {}
    for name in names:
        values = [s["scores"][name] for s in samples if name in s["scores"]]
        mean = sum(values) / len(values)
        stderr = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
        higher = not lower.get(task) if task != "win_rate" else not name.startswith("mean_")
        out[name] = {"value": mean, "stderr": stderr, "higher_is_better": higher}
    return out


def realistic_records(folder: Path, *, settings=("pretrained", "sft", "instruct"), families=("smollm2-135m", "gemma3-270m"),
                      methods=METHODS, tasks=tuple(TASK_ITEMS)) -> None:
    configs = {task: task_config(task) for task in tasks}
    rng = random.Random(14)
    index = 0
    for family in families:
        for setting in settings:
            base = {"avg": [float(rng.random() < 0.41) for _ in range(64)], "logratio": [float(rng.random() < 0.5) for _ in range(64)],
                    "mc1": [float(rng.random() < 0.25) for _ in range(24)], "mc2": [rng.random() * 0.8 for _ in range(24)],
                    "toxic": [float(rng.random() < 0.3) for _ in range(62)], "win": [float(rng.random() < 0.5) for _ in range(16)],
                    "gsm": [0.0, 1.0, 0.0, 0.0]}
            for method in (START, *methods):
                index += 1
                run_id = f"{family[:5]}{setting[:3]}{method}{index:03d}"
                consumed = {} if method == START else {"optimizer_steps": 8, "pairs": 64, "policy_tokens": 41000 + index,
                                                        "reference_tokens": 41000, "flops": 3.3e13, "match_ratio": 1.0,
                                                        "wall_seconds": 120.5, "peak_memory_mib": 2200.0}
                for task in tasks:
                    shift = EFFECTS.get(method, {}).get(task, 0.0)
                    samples = task_samples(task, rng, base, shift)
                    task_key = f"{task}-{run_id}"
                    append_record(folder, {
                        "run_id": run_id, "sweep": "mini-study", "family": family, "setting": setting, "method": method,
                        "variant": method, "task": task, "task_key": task_key, "measurement_key": f"m-{family}-{task}",
                        "status": "ok", "reason": None, "seed": 0, "task_config": configs[task], "consumed": consumed,
                        "metrics": metrics_of(samples, task), "finished_at": f"2026-12-05T09:{index % 60:02d}:00+00:00",
                        "samples_file": write_samples(folder, run_id, task_key, samples)})


SMALL = {"families": ("smollm2-135m",), "settings": ("sft", "instruct"), "methods": ("dpo", "ipo", "kto", "simpo")}  # tests: 10 rows


@pytest.fixture(scope="module")
def realistic_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("realistic")
    realistic_records(folder, **SMALL)
    build_leaderboard(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# labels
def test_labels_come_from_the_task_config_with_a_prettifier_behind():
    records = [{"task": "heldout_preference", "task_config": task_config("heldout_preference")},
               {"task": "truthfulqa_mc", "task_config": task_config("truthfulqa_mc")},
               {"task": "toxicity", "task_config": {"display": {"task": "Toxicity", "metrics": {"toxic_share": "Toxic share"}}}},
               {"task": "my_plugin_task"}]
    labels = Labels(records)
    assert labels.column("heldout_preference/avg_logp_accuracy") == "Held-out pref. acc. (avg log-p)"
    assert labels.column("truthfulqa_mc/mc2") == "TruthfulQA MC2"
    assert labels.column("toxicity/toxic_share/group=women") == "Toxic share · women"   # a breakdown: its metric + group
    assert labels.column("toxicity/toxic_share/hate") == "Toxic share · hate"
    assert labels.column("toxicity/mean_score") == "Toxicity: Mean score"               # not configured: prettified
    assert labels.task("my_plugin_task") == "My plugin task" and labels.task("unified") == "Unified score"
    assert labels.column("my_plugin_task/exact_match_flexible") == "My plugin task: Exact match flexible"
    assert prettify("avg_logp_accuracy") == "Avg log-p accuracy" and prettify("mc1") == "MC1"


def test_old_records_without_display_take_the_current_configs_labels():
    labels = Labels([{"task": "truthfulqa_mc"}, {"task": "gsm8k", "task_config": {"limit": 4}}])
    assert labels.column("truthfulqa_mc/mc1") == "TruthfulQA MC1"
    assert labels.task("truthfulqa_mc") == "TruthfulQA"


def test_display_is_not_a_task_parameter_and_not_in_the_score_key():
    from harness.run.registry import bound_arguments

    _, arguments = bound_arguments("task", "truthfulqa_mc", None, params_key="task_params")
    assert "display" not in arguments and "display" in task_config("truthfulqa_mc")


# ---------------------------------------------------------------------------------------------
# the mark, the scale, the forest data
def test_significant_means_the_interval_excludes_zero():
    assert significant({"difference": 0.2, "low": 0.05, "high": 0.3, "items": 64}) is True
    assert significant({"difference": -0.2, "low": -0.3, "high": -0.01, "items": 64}) is True
    assert significant({"difference": 0.1, "low": 0.0, "high": 0.3, "items": 64}) is False     # touches 0
    assert significant({"difference": 0.0, "low": -0.1, "high": 0.1, "items": 64}) is False
    assert significant({"note": "not comparable: measured differently"}) is None and significant(None) is None
    assert "95 % paired bootstrap interval" in LEGEND and "excludes 0" in LEGEND and LEGEND.startswith(MARK)


def test_colour_scales_are_anchored_not_min_max():
    assert SCORE_SCALE == (0.0, 1.0)
    # the spans of tied rows (all within ±0.02) still draw on at least ±0.1: ties look like ties
    assert difference_span([{"difference": 0.01, "low": -0.02, "high": 0.015}]) == DIFFERENCE_MIN_SPAN
    assert difference_span([{"difference": 0.3, "low": 0.2, "high": 0.45}]) == 0.45
    # equal differences get equal colours whatever else is on the board; the sign picks the hue
    assert difference_colour(0.05) == difference_colour(0.05) != difference_colour(-0.05)
    assert difference_colour(0.0001).lower() in ("#ffffff", "#fffffe", "#fefffe", "#fefefe", "#ffffff")
    assert difference_colour(0.1) == difference_colour(0.5)   # saturated at the span


def test_forest_rows_hold_each_rows_paired_differences(realistic_folder):
    board = Board(realistic_folder)
    rows = forest_rows(board)
    # every non-start row: the unified score and five tasks
    assert len(rows) == 2 * len(SMALL["methods"]) * (1 + len(TASK_ITEMS))
    assert not any(r["variant"] == START for r in rows)
    simpo = next(r for r in rows if (r["family"], r["setting"], r["variant"], r["task"])
                 == ("smollm2-135m", "sft", "simpo", "heldout_preference"))
    key, start = ("smollm2-135m", "sft", "simpo"), ("smollm2-135m", "sft", START)
    expected = board.paired_difference(key, start, "heldout_preference")
    assert {k: simpo[k] for k in expected} == expected and simpo["significant"] is True and simpo["difference"] > 0
    unified = next(r for r in rows if r["variant"] == "simpo" and r["task"] == "unified" and r["setting"] == "sft"
                   and r["family"] == "smollm2-135m")
    assert unified["difference"] == pytest.approx(board.unified_difference(key, start)["difference"])
    kto = [r for r in rows if r["variant"] == "kto"]
    assert all(r["significant"] is False for r in kto if r["task"] in ("gsm8k",))   # an untouched row on 4 items
    assert headline_metric(board, "heldout_preference") == "avg_logp_accuracy"
    assert headline_metric(board, "toxicity") == "toxic_share"


# ---------------------------------------------------------------------------------------------
# every format
def test_marks_labels_and_legend_in_markdown_csv_and_latex(realistic_folder):
    board = Board(realistic_folder)
    text = markdown(board)
    assert f"`{MARK}` = {LEGEND_TEXT}" in text
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert "Held-out pref. acc. (avg log-p)" in header and "heldout_preference/avg_logp_accuracy" not in header
    simpo = next(line for line in text.split("## smollm2-135m · sft")[1].splitlines() if line.startswith("| simpo |"))
    assert f" {MARK} |" in simpo or f"{MARK}**" in simpo
    kto = next(line for line in text.split("## smollm2-135m · sft")[1].splitlines() if line.startswith("| kto |"))
    assert MARK not in kto.replace("**", "")
    rows = list(csv.DictReader(io.StringIO(csv_text(board))))
    assert "heldout_preference/avg_logp_accuracy" in rows[0]            # the CSV keeps raw keys
    simpo_row = next(r for r in rows if (r["family"], r["setting"], r["variant"]) == ("smollm2-135m", "sft", "simpo"))
    assert simpo_row["delta heldout_preference significant"] == "True"
    assert next(r for r in rows if r["variant"] == "start")["delta heldout_preference significant"] == ""
    tex = latex(board)
    assert "Held-out pref. acc. (avg log-p)" in tex and "\\textsuperscript{*}" in tex and "excludes 0" in tex


def test_empty_sections_are_left_out(realistic_folder, tmp_path):
    board = Board(realistic_folder)
    assert board.published == []
    text = markdown(board)
    assert "Published reference numbers" not in text and "curves.png" not in text
    page = (realistic_folder / "leaderboard.html").read_text()
    assert "Published reference numbers" not in page and "training curves" not in page.lower()
    # a board of one start row: no forest plot, no Δ sections
    realistic_records(tmp_path, settings=("sft",), families=("smollm2-135m",), methods=())
    outputs = build_leaderboard(tmp_path)
    assert "plot forest" not in outputs and "Δ" not in outputs["markdown"].read_text().split(LEGEND_TEXT)[-1]


# ---------------------------------------------------------------------------------------------
# the page in headless Chromium
def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="Debian chromium not installed")
def test_page_reads_at_a_glance_at_1400_px(realistic_folder):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((realistic_folder / "leaderboard.html").as_uri())
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 1400
        table = page.locator("#leaderboard")
        assert table.bounding_box()["width"] <= 1400 - 16
        # the forest plot is the first figure, above the main table
        forest = page.locator("figure#forest img")
        assert forest.count() == 1
        assert forest.bounding_box()["y"] < table.bounding_box()["y"]
        # readable headers, raw keys on hover
        header = page.locator("#leaderboard th[data-column='heldout_preference/avg_logp_accuracy']")
        assert "Held-out pref. acc. (avg log-p)" in header.inner_text()
        assert "heldout_preference/avg_logp_accuracy" in header.get_attribute("title")
        # the mark: significant cells carry it and a class; the legend says what it means
        marked = page.locator("#leaderboard td.significant")
        assert marked.count() > 0 and all(MARK in marked.nth(i).inner_text() for i in range(min(marked.count(), 5)))
        assert "excludes 0" in page.locator("#legend").inner_text()
        # no empty section: every h2 is followed by content
        assert page.locator("h2", has_text="Published").count() == 0
        empty = page.evaluate("""[...document.querySelectorAll('section')].filter(s => s.innerText.trim().split('\\n').length < 2).length""")
        assert empty == 0
        # details are there, collapsed
        details = page.locator("details#all-metrics")
        assert details.count() == 1 and details.get_attribute("open") is None
        assert page.locator("#details-table th[title='toxicity/mean_score']").text_content() == "Mean toxicity score"
        page.locator("details#all-metrics summary").click()
        page.locator("#show-breakdowns").check()
        assert page.locator("#details-table th[title='toxicity/toxic_share/group=women']").inner_text() == "Toxic share · women"
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 1400   # the wide details table scrolls in its box
        browser.close()


def test_a_cell_reads_the_differences_keys_multi_seed_ones_included():
    """The page shows the board's interval as given (a multi-seed row's dict adds ``seeds`` and ``seed_sd``), marks it
    when significant and tints it on the fixed scale; a note stands for itself."""
    from harness.report.html import difference_cell

    difference = {"difference": 0.25, "low": 0.05, "high": 0.45, "items": 64, "seeds": 3, "seed_sd": 0.02}
    cell = difference_cell({**difference, "significant": significant(difference)})
    assert cell["sub"] == f"Δ +0.250 [+0.050, +0.450] {MARK}" and cell["cls"] == "significant"
    assert cell["subtitle"] == "64 items, 3 seeds" and cell["colour"] == difference_colour(0.25)
    tied = difference_cell({"difference": 0.0, "low": -0.01, "high": 0.01, "items": 64, "significant": False})
    assert tied["sub"] == "Δ +0.000 [-0.010, +0.010]" and "cls" not in tied and "colour" not in tied
    assert difference_cell({"note": "not comparable: measured differently"})["sub"] == "not comparable: measured differently"


def test_a_setting_skipped_on_every_row_is_one_line_and_no_heatmap_column(tmp_path):
    realistic_records(tmp_path, **SMALL)
    reason = "checkpoint HuggingFaceTB/SmolLM2-135M is not available here (LocalEntryNotFoundError)"
    for method in (START, *SMALL["methods"]):
        append_record(tmp_path, {"run_id": f"skip-{method}", "sweep": "mini-study", "family": "smollm2-135m",
                                 "setting": "pretrained", "method": method, "variant": method,
                                 "task": "heldout_preference", "task_key": f"heldout_preference-skip-{method}",
                                 "measurement_key": "m-smollm2-135m-heldout_preference", "status": "skipped",
                                 "reason": reason, "seed": None if method == START else 0,
                                 "task_config": task_config("heldout_preference"), "consumed": {}, "metrics": {},
                                 "finished_at": "2026-12-05T10:00:00+00:00"})
    board = Board(tmp_path)
    text = markdown(board)
    section = text.split("## smollm2-135m · pretrained")[1].split("## ")[0]
    assert f"skipped: {reason}" in section and "| variant |" not in section  # one line, not a table of skips
    assert section.count(reason) == 1
    labels, settings, cells = matrix(board)
    assert "smollm2-135m · pretrained" in settings  # the matrix still lists it; the heatmap leaves it out and names it
    assert heatmap_columns(labels, settings, cells) == (["smollm2-135m · sft", "smollm2-135m · instruct"],
                                                        ["smollm2-135m · pretrained"])
    figure_path = heatmap(board, tmp_path)
    assert figure_path is not None and figure_path.exists()
