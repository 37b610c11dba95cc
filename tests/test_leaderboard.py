"""The leaderboard from a fixture set of records: golden Markdown and CSV, unified score, paired
bootstrap, LaTeX, and the HTML page in headless Chromium (sorting, row count, escaped model text); rows per
variant, the newest record, comparability (measurement and items), ties, intervals of every metric in [0, 1],
``--compare`` of any number of variants, and no import circle in ``harness/report``.

Regenerate the golden files after an intended change: UPDATE_GOLDEN=1 python -m pytest tests/test_leaderboard.py
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from harness.records import append_record, write_samples
from harness.report.board import TIE_TOLERANCE, measurement_key_of, variant_of
from harness.report.leaderboard import Board, build_leaderboard, compare, paired_bootstrap

GOLDEN = Path(__file__).parent / "golden"
SCRIPT = "<script>document.title='pwned'</script>"

# per-item scores: (setting, method) -> (truthfulqa mc1 items, toxicity toxic items)
ITEMS = {
    ("instruct", "start"): ([1, 0, 0, 0], [1, 1, 0, 0]),
    ("instruct", "dpo"): ([1, 1, 0, 0], [1, 0, 0, 0]),
    ("instruct", "kto"): ([1, 1, 1, 0], [1, 1, 1, 0]),
    ("sft", "start"): ([0, 0, 0, 0], [1, 0, 0, 0]),
    ("sft", "dpo"): ([1, 0, 0, 0], [0, 0, 0, 0]),
}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def fixture_records(folder: Path) -> None:
    for index, ((setting, method), (truthful, toxic)) in enumerate(ITEMS.items()):
        run_id = f"run{index}"
        base = {"run_id": run_id, "sweep": "fixture", "family": "fixture", "setting": setting, "method": method,
                "status": "ok", "reason": None, "seed": 0,
                "consumed": {} if method == "start" else {"optimizer_steps": 2, "pairs": 16, "policy_tokens": 3000 + index,
                                                          "reference_tokens": 3000, "flops": 2.5e12, "wall_seconds": 40.5,
                                                          "peak_memory_mib": 2048.0}}
        samples = [{"item_id": str(i), "scores": {"mc1": float(v)}, "output": SCRIPT if i == 0 else f"answer {i}"}
                   for i, v in enumerate(truthful)]
        value, stderr = mean_and_stderr([float(v) for v in truthful])
        append_record(folder, {**base, "task": "truthfulqa_mc", "task_key": "truthfulqa_mc-x", "task_version": "1",
                               "metrics": {"mc1": {"value": value, "stderr": stderr, "higher_is_better": True}},
                               "samples_file": write_samples(folder, run_id, "truthfulqa_mc-x", samples)})
        samples = [{"item_id": f"p{i}", "scores": {"toxic_share": float(v)}, "continuation": f"text {i}"}
                   for i, v in enumerate(toxic)]
        value, stderr = mean_and_stderr([float(v) for v in toxic])
        append_record(folder, {**base, "task": "toxicity", "task_key": "toxicity-x", "task_version": "1",
                               "metrics": {"toxic_share": {"value": value, "stderr": stderr, "higher_is_better": False},
                                           "mean_length": {"value": 12.5, "stderr": 1.0, "higher_is_better": False}},
                               "samples_file": write_samples(folder, run_id, "toxicity-x", samples)})
    append_record(folder, {"run_id": "run9", "sweep": "fixture", "family": "fixture", "setting": "sft", "method": "kto",
                           "task": "truthfulqa_mc", "task_key": "truthfulqa_mc-x", "status": "failed",
                           "reason": "RuntimeError: out of memory (traceback: logs/run9.log)", "metrics": {}, "consumed": {}})
    (folder / "curves").mkdir(exist_ok=True)
    (folder / "curves" / "run1.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.69 - 0.1 * s, "rewards/margins": 0.1 * s}) + "\n" for s in (1, 2)))


@pytest.fixture()
def board_folder(tmp_path) -> Path:
    fixture_records(tmp_path)
    return tmp_path


def golden_check(path: Path, name: str, folder: Path) -> None:
    text = path.read_text().replace(str(folder), "<folder>")
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{name} differs from tests/golden/{name} (UPDATE_GOLDEN=1 to accept)"


def test_golden_markdown_and_csv(board_folder):
    outputs = build_leaderboard(board_folder)
    golden_check(outputs["markdown"], "leaderboard.md", board_folder)
    golden_check(outputs["csv"], "leaderboard.csv", board_folder)


def test_unified_score_and_alignment_tax_by_hand(board_folder):
    board = Board(board_folder)
    # instruct · dpo: mc1 = 2/4 = 0.5; toxic share 1/4 → mapped 0.75; unified = (0.5 + 0.75) / 2 = 0.625
    assert board.unified(("fixture", "instruct", "dpo")) == (0.625, 2)
    # instruct · kto: mc1 0.75, toxic 0.75 → mapped 0.25: unified 0.5; start: 0.25 and 0.5 → 0.375
    assert board.ranks()[("fixture", "instruct", "dpo")] == 1
    assert board.ranks()[("fixture", "instruct", "kto")] == 2
    assert board.ranks()[("fixture", "instruct", "start")] == 3
    # dpo − start on truthfulqa: per item (1−1, 1−0, 0, 0) → mean +0.25
    difference = board.paired_difference(("fixture", "instruct", "dpo"), ("fixture", "instruct", "start"), "truthfulqa_mc")
    assert difference["difference"] == pytest.approx(0.25) and difference["items"] == 4
    assert difference["low"] <= 0.25 <= difference["high"]
    # sft · kto failed: it is shown, not ranked
    assert board.status(("fixture", "sft", "kto"))[0] == "failed"
    assert board.ranks()[("fixture", "sft", "kto")] is None


def test_paired_bootstrap_of_identical_runs_is_zero():
    same = {str(i): float(i % 2) for i in range(20)}
    assert paired_bootstrap(same, same) == {"difference": 0.0, "low": 0.0, "high": 0.0, "items": 20}
    assert paired_bootstrap({"a": 1.0}, {"b": 1.0}) is None


def test_compare_cli_prints_intervals(board_folder, cache_dir):
    result = run_cli("leaderboard", str(board_folder), "--compare", "dpo", "kto", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "dpo − kto" in result.stdout and "instruct" in result.stdout and "truthfulqa_mc" in result.stdout
    rows = compare(Board(board_folder), "dpo", "kto")
    toxicity = next(r for r in rows if r["setting"] == "instruct" and r["task"] == "toxicity" and r["metric"] == "score")
    assert toxicity["difference"] == pytest.approx(0.5)  # mapped toxicity: dpo 0.75, kto 0.25
    bad = run_cli("leaderboard", str(board_folder), "--compare", "dpo", "nosuchvariant", cache=cache_dir)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"align-harness: error: no variant or method 'nosuchvariant' in {board_folder}; variants here: start, dpo, kto"]


def test_latex_is_booktabs_with_best_in_bold(board_folder):
    text = build_leaderboard(board_folder)["latex"].read_text()
    assert "\\toprule" in text and "\\bottomrule" in text
    assert "\\textbf{0.750 $\\pm$ 0.250}" in text   # kto's mc1 is the best of instruct
    assert "\\textbf{0.250 $\\pm$ 0.250}" in text   # dpo's toxic share is the lowest of instruct


def add_breakdown(folder: Path) -> None:
    """Give every toxicity record a per-group breakdown metric."""
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    (folder / "records.jsonl").unlink()
    for record in records:
        if record["task"] == "toxicity":
            record["metrics"]["toxic_share/group=women"] = {"value": 0.5, "stderr": 0.25, "higher_is_better": False}
        append_record(folder, record)


def test_breakdowns_leave_the_main_table_for_their_own(board_folder):
    """Per-group breakdowns (a metric name with its own "/") are rows of a transposed table under the setting's main
    table in Markdown, absent from LaTeX, and columns of the CSV."""
    add_breakdown(board_folder)
    outputs = build_leaderboard(board_folder)
    text = outputs["markdown"].read_text()
    main_header = next(line for line in text.splitlines() if line.startswith("| variant | unified"))
    assert "women" not in main_header and "Toxic share (lower better)" in main_header   # labels from conf/task/toxicity.yaml
    instruct = text.split("## fixture · instruct")[1]
    assert "### Breakdowns" in instruct.split("</details>")[0]                          # folded under the main table
    assert "| Toxic share · women | 0.5000 ± 0.2500 | 0.5000 ± 0.2500 | 0.5000 ± 0.2500 |" in instruct
    assert "group=women" not in outputs["latex"].read_text()
    assert "toxicity/toxic_share/group=women" in outputs["csv"].read_text().splitlines()[0]


def test_published_rows_come_from_an_experiment_config(board_folder, cache_dir):
    result = run_cli("leaderboard", str(board_folder), "--experiment", "simpo-mistral-instruct", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    text = (board_folder / "leaderboard.md").read_text()
    assert "Published reference numbers" in text and "Meng et al. 2024 (SimPO)" in text


def test_published_rows_without_a_number_show_as_missing(board_folder, cache_dir):
    result = run_cli("leaderboard", str(board_folder), "--experiment", "dpo-vs-ppo", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    text = (board_folder / "leaderboard.md").read_text()
    assert "| Xu et al. 2024 | not located | Llama-2-7B + SFT | sft | ppo | hh-rlhf | openassistant_reward | missing [1] |" in text
    assert "- [1] missing: the paper's result tables (arXiv:2404.10719) could not be read" in text
    page = (board_folder / "leaderboard.html").read_text()
    assert '<td class="text missing" title="the paper' in page  # server-rendered: "missing", the reason on hover


def test_plots_are_written_as_png_and_svg(board_folder):
    build_leaderboard(board_folder)
    for name in ("forest", "tasks", "heatmap", "curves"):
        assert (board_folder / "plots" / f"{name}.png").stat().st_size > 1000
        assert (board_folder / "plots" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"), reason="Debian chromium not installed")
def test_html_page_in_headless_chromium(board_folder):
    playwright = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") else __import__(
        "playwright.sync_api", fromlist=["sync_playwright"])
    page_path = build_leaderboard(board_folder)["html"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(page_path.as_uri())
        rows = page.locator("#leaderboard tbody tr")
        assert rows.count() == 6                       # 5 scored rows + the failed sft · kto
        first = lambda i, column: rows.nth(i).locator("td").nth(column).locator("span").first.inner_text()
        methods = lambda: [first(i, 0) for i in range(rows.count())]   # the variant, its family · setting below
        page.locator("#leaderboard th[data-column='unified_score']").click()
        scores = [first(i, 1) for i in range(rows.count())]
        numbers = [float(s) for s in scores if s != "—"]
        assert numbers == sorted(numbers)
        page.locator("#leaderboard th[data-column='unified_score']").click()
        numbers = [float(first(i, 1)) for i in range(rows.count()) if first(i, 1) != "—"]
        assert numbers == sorted(numbers, reverse=True)
        page.select_option("#filter-setting", "sft")
        assert set(methods()) == {"start", "dpo", "kto"}
        assert page.title() != "pwned"                  # the model's <script> did not run
        page.locator("#samples summary").click()        # the viewer is folded
        samples = page.locator("#sample-list pre").first.inner_text()
        assert SCRIPT in samples                        # ... and shows as text
        assert page.locator("#sample-list script").count() == 0
        assert page.locator("figure img").count() >= 3
        browser.close()


@pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"), reason="Debian chromium not installed")
def test_html_breakdown_columns_show_on_request(board_folder):
    from playwright.sync_api import sync_playwright

    add_breakdown(board_folder)
    page_path = build_leaderboard(board_folder)["html"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(page_path.as_uri())
        breakdown = "#details-table th[data-column='toxicity/toxic_share/group=women']"
        assert page.locator(breakdown).count() == 0 and page.locator(
            "#details-table th[data-column='toxicity/toxic_share']").count() == 1
        page.locator("#all-metrics summary").click()    # all metrics are folded under the main table
        page.locator("#show-breakdowns").check()
        assert page.locator(breakdown).count() == 1
        browser.close()


# ---------------------------------------------------------------------------------------------
# rows per variant, comparability, ties, intervals (records carrying variant and measurement_key)
def add_run(folder: Path, run_id: str, variant: str, scores: dict[str, list[float]], *, task: str = "truthfulqa_mc",
            higher: dict[str, bool] | None = None, items: list[str] | None = None, **fields) -> None:
    """One record of ``task`` as the sweep writes it, with per-item ``scores`` {metric: values} in its samples."""
    items = items or [str(i) for i in range(len(next(iter(scores.values()))))]
    samples = [{"item_id": item, "scores": {name: values[i] for name, values in scores.items()}}
               for i, item in enumerate(items)]
    metrics = {}
    for name, values in scores.items():
        value, stderr = mean_and_stderr([float(v) for v in values])
        metrics[name] = {"value": value, "stderr": stderr, "higher_is_better": (higher or {}).get(name, True)}
    task_key = fields.pop("task_key", f"{task}-{run_id}")
    append_record(folder, {"run_id": run_id, "sweep": "fixture", "family": "fixture", "setting": "instruct",
                           "method": variant.split("[")[0].split("#")[0], "variant": variant, "task": task,
                           "task_key": task_key, "measurement_key": "m1", "status": "ok", "reason": None,
                           "metrics": metrics, "consumed": {},
                           "samples_file": write_samples(folder, run_id, task_key, samples), **fields})


def row(markdown_text: str, label: str) -> list[str]:
    """The cells of the first table row labelled ``label``."""
    line = next(line for line in markdown_text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_one_row_per_variant_and_one_label_from_two_runs_stays_two_rows(tmp_path):
    add_run(tmp_path, "run0", "start", {"mc1": [1, 0, 0, 0]})
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 1, 0, 0]})
    add_run(tmp_path, "run2", "dpo[beta=0.05,pairs=64]", {"mc1": [1, 1, 1, 0]})
    add_run(tmp_path, "abcdef01", "kto", {"mc1": [0, 0, 0, 0]})   # two budgets, one label
    add_run(tmp_path, "abcdef02", "kto", {"mc1": [1, 1, 1, 1]})
    board = Board(tmp_path)
    assert [key[2] for key in board.keys] == ["start", "dpo", "dpo[beta=0.05,pairs=64]", "kto#abcdef01", "kto#abcdef02"]
    assert board.metric(("fixture", "instruct", "dpo[beta=0.05,pairs=64]"), "truthfulqa_mc/mc1")["value"] == 0.75
    assert board.metric(("fixture", "instruct", "kto#abcdef02"), "truthfulqa_mc/mc1")["value"] == 1.0
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    assert row(text, "dpo[beta=0.05,pairs=64]")[1] == "0.7500" and row(text, "kto#abcdef01")[1] == "0.0000"
    csv = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("family,setting,method,variant,") and len(csv) == 6
    # a method name stands for all its variants
    rows = compare(board, "dpo")
    assert {(r["a"], r["b"]) for r in rows} == {("dpo", "dpo[beta=0.05,pairs=64]")}


def test_newest_record_of_a_row_and_task_wins(tmp_path):
    add_run(tmp_path, "run0", "start", {"mc1": [1, 0, 0, 0]})
    add_run(tmp_path, "run1", "dpo", {"mc1": [0, 0, 0, 0]}, task_key="truthfulqa_mc-a", finished_at="2025-01-02T00:00:00+00:00")
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 1, 0, 0]}, task_key="truthfulqa_mc-b", finished_at="2025-01-03T00:00:00+00:00")
    dpo = ("fixture", "instruct", "dpo")
    assert Board(tmp_path).keys == [("fixture", "instruct", "start"), dpo]
    assert Board(tmp_path).metric(dpo, "truthfulqa_mc/mc1")["value"] == 0.5            # later in the file
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 1, 1, 1]}, task_key="truthfulqa_mc-c", finished_at="2025-01-01T00:00:00+00:00")
    assert Board(tmp_path).metric(dpo, "truthfulqa_mc/mc1")["value"] == 0.5            # ... unless it finished earlier
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 1, 1, 0]}, task_key="truthfulqa_mc-a", finished_at="2025-01-04T00:00:00+00:00")
    assert Board(tmp_path).metric(dpo, "truthfulqa_mc/mc1")["value"] == 0.75           # same (run, task_key): replaced


def test_measured_differently_is_not_comparable(tmp_path, cache_dir):
    add_run(tmp_path, "run0", "start", {"mc1": [1, 0, 0, 0]})
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 0, 0, 0]}, measurement_key="m2")   # e.g. another eval batch size
    add_run(tmp_path, "run2", "kto", {"mc1": [1, 1, 0, 0]})
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    header = row(text, "variant")
    dpo = dict(zip(header, row(text, "dpo")))
    assert dpo["Δ TruthfulQA MC1"] == "not comparable: measured differently" and dpo["rank"] == "—"
    assert dict(zip(header, row(text, "kto")))["Δ TruthfulQA MC1"].startswith("+0.250 [")
    assert dict(zip(header, row(text, "kto")))["rank"] == "1" and dict(zip(header, row(text, "start")))["rank"] == "2"
    assert "-0.000" not in text and "not comparable: measured differently" in row(
        text.split("### Δ per metric from start")[1], "TruthfulQA MC1 (higher better)")
    csv = (tmp_path / "leaderboard.csv").read_text()
    assert "not comparable: measured differently" in next(line for line in csv.splitlines() if ",dpo," in line)
    result = run_cli("leaderboard", str(tmp_path), "--compare", "dpo", "start", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "not comparable: truthfulqa_mc measured differently" in result.stdout   # the unified line
    assert "not comparable: measured differently" in result.stdout and "-0.0000" not in result.stdout


def test_a_start_row_measured_two_ways_compares_with_rows_of_either(tmp_path):
    """The start scored on 4 items, then (newer) on 2: a row measured like either gets its Δ against that record;
    the start row's cells and the ranks show its newest record."""
    add_run(tmp_path, "run0", "start", {"mc1": [1, 0, 0, 0]}, task_key="truthfulqa_mc-a",
            finished_at="2025-01-01T00:00:00+00:00")
    add_run(tmp_path, "run1", "kto", {"mc1": [1, 1, 1, 0]}, finished_at="2025-01-02T00:00:00+00:00")
    add_run(tmp_path, "run0", "start", {"mc1": [0, 1]}, task_key="truthfulqa_mc-b", measurement_key="m-two",
            finished_at="2025-01-03T00:00:00+00:00")
    add_run(tmp_path, "run2", "dpo", {"mc1": [1, 1]}, measurement_key="m-two", finished_at="2025-01-04T00:00:00+00:00")
    add_run(tmp_path, "run3", "ipo", {"mc1": [1, 1]}, measurement_key="m-three", finished_at="2025-01-05T00:00:00+00:00")
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    header = row(text, "variant")
    cells = {label: dict(zip(header, row(text, label))) for label in ("start", "kto", "dpo", "ipo")}
    assert cells["start"]["TruthfulQA MC1 (higher better)"].startswith("0.5000")           # its newest record
    assert cells["kto"]["Δ TruthfulQA MC1"].startswith("+0.500 [")                         # vs the 4-item start
    assert cells["dpo"]["Δ TruthfulQA MC1"].startswith("+0.500 [")                         # vs the 2-item start
    assert cells["ipo"]["Δ TruthfulQA MC1"] == "not comparable: measured differently"
    assert cells["dpo"]["rank"] == "1" and cells["kto"]["rank"] == "—"                    # ranks: one measurement


def test_different_items_are_not_comparable(tmp_path):
    add_run(tmp_path, "run0", "start", {"mc1": [1, 0, 0, 0]})
    add_run(tmp_path, "run1", "dpo", {"mc1": [1, 0, 0, 0, 1, 1, 0, 0]})              # another limit, same config hash
    add_run(tmp_path, "run2", "kto", {"mc1": [1, 0, 0, 0]}, items=["0", "1", "7", "8"])
    board = Board(tmp_path)
    start = ("fixture", "instruct", "start")
    assert board.paired_difference(("fixture", "instruct", "dpo"), start, "truthfulqa_mc") == {
        "note": "not comparable: items differ (8 vs 4)"}
    assert board.paired_difference(("fixture", "instruct", "kto"), start, "truthfulqa_mc", "mc1") == {
        "note": "not comparable: items differ (4 vs 4, 2 shared)"}
    assert board.ranks() == {start: 1, ("fixture", "instruct", "dpo"): None, ("fixture", "instruct", "kto"): None}
    text = build_leaderboard(board.folder)["markdown"].read_text()
    assert "not comparable: items differ (8 vs 4)" in row(text, "dpo")


def test_ties_within_noise_share_a_rank(tmp_path):
    """Competition ranking: 1, 2, 2, 4 — 0.376843 and 0.376842 are float noise apart."""
    for run_id, variant, value in [("run0", "start", 0.2), ("run1", "a", 0.5), ("run2", "b", 0.376843),
                                   ("run3", "c", 0.376842), ("run4", "d", 0.3767)]:
        append_record(tmp_path, {"run_id": run_id, "sweep": "fixture", "family": "fixture", "setting": "instruct",
                                 "method": variant, "variant": variant, "task": "truthfulqa_mc",
                                 "task_key": f"truthfulqa_mc-{run_id}", "measurement_key": "m1", "status": "ok",
                                 "metrics": {"mc1": {"value": value, "stderr": 0.01, "higher_is_better": True}}})
    ranks = {key[2]: rank for key, rank in Board(tmp_path).ranks().items()}
    assert ranks == {"a": 1, "b": 2, "c": 2, "d": 4, "start": 5}
    assert 0.376843 - 0.3767 >= TIE_TOLERANCE > 0.376843 - 0.376842
    assert row(build_leaderboard(tmp_path)["markdown"].read_text(), "c")[2] == "2"


def test_every_metric_in_0_1_gets_an_interval_not_only_primary_ones(tmp_path):
    """heldout_preference: the unified score uses avg_logp_accuracy (primary); logratio_accuracy gets its standard
    error (from the samples when the record has none) and its Δ with a bootstrap interval all the same."""
    config = {"task_config": {"primary_metrics": ["avg_logp_accuracy"]}}
    for run_id, variant, logratio in [("run0", "start", [0, 0, 1, 0]), ("run1", "dpo", [1, 1, 1, 0]),
                                      ("run2", "kto", [1, 0, 1, 1])]:
        add_run(tmp_path, run_id, variant, {"avg_logp_accuracy": [1, 0, 0, 1], "logratio_accuracy": logratio},
                task="heldout_preference", **config)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    (tmp_path / "records.jsonl").unlink()
    for record in records:
        record["metrics"]["logratio_accuracy"]["stderr"] = None
        append_record(tmp_path, record)
    board = Board(tmp_path)
    dpo, start = ("fixture", "instruct", "dpo"), ("fixture", "instruct", "start")
    assert board.task_score(dpo, "heldout_preference") == 0.5          # primary only
    assert board.metric(dpo, "heldout_preference/logratio_accuracy")["stderr"] == pytest.approx(0.25)
    difference = board.paired_difference(dpo, start, "heldout_preference", "logratio_accuracy")
    assert difference["difference"] == pytest.approx(0.5) and difference["items"] == 4
    assert difference["low"] <= 0.5 <= difference["high"] and difference["low"] < difference["high"]
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    assert "0.5000 ± 0.2887" in row(text, "dpo")                          # the main table: the primary metric
    all_metrics = text.split("### All metrics")[1]
    assert row(all_metrics, "Held-out pref. acc. (log-ratio) (higher better)")[1:] == [
        "`heldout_preference/logratio_accuracy`", "0.2500 ± 0.2500", "0.7500 ± 0.2500", "0.7500 ± 0.2500"]
    assert row(text.split("### Δ per metric from start")[1], "Held-out pref. acc. (log-ratio) (higher better)")[1] == fmt(difference)
    header = (tmp_path / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"delta heldout_preference/logratio_accuracy low", "delta heldout_preference/logratio_accuracy high",
            "delta heldout_preference/avg_logp_accuracy low"} <= set(header)


def fmt(difference: dict) -> str:
    return f"{difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"


def test_compare_three_variants_and_all_pairs_through_the_cli(board_folder, cache_dir):
    named = run_cli("leaderboard", str(board_folder), "--compare", "kto", "dpo", "start", cache=cache_dir)
    assert named.returncode == 0, named.stderr
    for pair in ("kto − dpo · fixture · instruct", "kto − start · fixture · instruct", "dpo − start · fixture · instruct",
                 "dpo − start · fixture · sft"):
        assert pair in named.stdout
    block = named.stdout.split("kto − dpo · fixture · instruct")[1].split("\n\n")[0]
    lines = {tuple(line.split()[:2]): line for line in block.splitlines()[2:]}
    assert set(lines) == {("unified", "score"), ("truthfulqa_mc", "score"), ("truthfulqa_mc", "mc1"),
                          ("toxicity", "score"), ("toxicity", "mean_length"), ("toxicity", "toxic_share")}
    assert lines[("toxicity", "toxic_share")].split()[-4:] == ["+0.5000", "[+0.0000,", "+1.0000]", "4"]
    assert lines[("truthfulqa_mc", "mc1")].split()[-4:] == ["+0.2500", "[+0.0000,", "+0.7500]", "4"]
    assert lines[("unified", "score")].split()[-4:] == ["-0.1250", "[-0.3750,", "+0.1250]", "8"]
    assert "no per-item scores" in lines[("toxicity", "mean_length")]
    every = run_cli("leaderboard", str(board_folder), "--compare", cache=cache_dir)
    assert every.returncode == 0, every.stderr
    pairs = [line for line in every.stdout.splitlines() if " − " in line and " · " in line]
    assert pairs == ["dpo − kto · fixture · sft", "dpo − start · fixture · sft", "kto − start · fixture · sft",
                     "dpo − kto · fixture · instruct", "dpo − start · fixture · instruct", "kto − start · fixture · instruct"]
    assert "kto has no scores (failed)" in every.stdout
    one = run_cli("leaderboard", str(board_folder), "--compare", "kto", cache=cache_dir)
    assert one.returncode == 2 and one.stderr.startswith("align-harness: error: no (family, setting) holds two of 'kto'")


def test_old_records_without_variant_or_measurement_key_are_read(board_folder):
    """Records written before ``variant`` / ``measurement_key``: the row is the method, the measurement the task_key."""
    old = json.loads((board_folder / "records.jsonl").read_text().splitlines()[0])
    assert "variant" not in old and "measurement_key" not in old
    assert variant_of(old) == old["method"] and measurement_key_of(old) == old["task_key"]
    assert variant_of({**old, "variant": "dpo[beta=0.05]"}) == "dpo[beta=0.05]"
    assert measurement_key_of({**old, "measurement_key": "m1"}) == "m1"
    board = Board(board_folder)
    assert [key[2] for key in board.keys] == ["start", "dpo", "kto", "start", "dpo", "kto"]
    # a newer record measured under a measurement_key never counts as measured like an old one
    add_run(board_folder, "run7", "ipo", {"mc1": [1, 0, 0, 0]}, task_key="truthfulqa_mc-x")
    board = Board(board_folder)
    assert board.paired_difference(("fixture", "instruct", "ipo"), ("fixture", "instruct", "start"), "truthfulqa_mc") == {
        "note": "not comparable: measured differently"}


def test_report_package_has_no_import_circle():
    """published and labels import no report module; board imports published (it checks an experiment's rows);
    headline imports board; plots and html import those; leaderboard imports them all; no module imports back."""
    folder = Path(__file__).resolve().parent.parent / "harness" / "report"
    imports = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imports[path.stem] = {name.rsplit(".", 1)[1] for name in names if name.startswith("harness.report.")}
    assert imports["published"] == set() and imports["labels"] == set() and imports["board"] == {"published"}
    assert imports["headline"] == {"board"}
    assert imports["plots"] == {"board", "headline", "labels"} and imports["html"] == {"board", "headline", "labels"}
    assert imports["leaderboard"] == {"board", "plots", "html", "headline", "labels", "published"}

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(name == target or (name not in seen and reaches(name, target, seen | {name}))
                   for name in imports.get(start, ()))

    assert not [module for module in imports if reaches(module, module)]


# ---------------------------------------------------------------------------------------------
# TruthfulQA: the main table's column and its Δ are one metric, and the headers say which
def add_truthfulqa(folder: Path, run_id: str, variant: str, mc1: list[float], mc2: list[float], **fields) -> None:
    """A truthfulqa_mc record as the task writes it: two samples an item, one per lm-eval subtask (mc1, then mc2)."""
    samples = [{"item_id": str(i), "subtask": name, "scores": {name: value}}
               for name, values in (("mc1", mc1), ("mc2", mc2)) for i, value in enumerate(values)]
    metrics = {name: dict(zip(("value", "stderr"), mean_and_stderr(values)), higher_is_better=True)
               for name, values in (("mc1", mc1), ("mc2", mc2))}
    append_record(folder, {"run_id": run_id, "sweep": "fixture", "family": "fixture", "setting": "instruct",
                           "method": variant, "variant": variant, "task": "truthfulqa_mc", "task_key": f"tq-{run_id}",
                           "measurement_key": "m1", "status": "ok", "reason": None, "metrics": metrics, "consumed": {},
                           "samples_file": write_samples(folder, run_id, f"tq-{run_id}", samples), **fields})


# MC1 falls by 0.25 while MC2 rises by 0.25 (per item +0.25, +0.25, 0, +0.5): a column of one and a Δ of the other
# (or of their mean, 0) would disagree
START_MC = ([1, 0, 0, 0], [0.5, 0.25, 0.25, 0.0])
DPO_MC = ([0, 0, 0, 0], [0.75, 0.5, 0.25, 0.5])


@pytest.mark.parametrize("task_config", [{"primary_metrics": ["mc2"]}, None], ids=["configured", "older-record"])
def test_truthfulqa_column_and_its_delta_are_mc2_and_say_so(tmp_path, task_config):
    """conf/task/truthfulqa_mc.yaml makes MC2 the primary metric: the main table shows MC2 and its Δ is MC2's
    difference (+0.25, by hand above), both headed "TruthfulQA MC2". A record scored before the config named it
    (no ``primary_metrics`` in its task_config) takes the shipped config's, as labels do."""
    fields = {"task_config": task_config} if task_config else {}
    add_truthfulqa(tmp_path, "run0", "start", *START_MC, **fields)
    add_truthfulqa(tmp_path, "run1", "dpo", *DPO_MC, **fields)
    board = Board(tmp_path)
    dpo, start = ("fixture", "instruct", "dpo"), ("fixture", "instruct", "start")
    assert board.task_score(dpo, "truthfulqa_mc") == pytest.approx(0.5)          # MC2 alone, not (0 + 0.5) / 2
    difference = board.paired_difference(dpo, start, "truthfulqa_mc")
    assert difference["difference"] == pytest.approx(0.25) and difference["items"] == 4
    assert difference == board.paired_difference(dpo, start, "truthfulqa_mc", "mc2")
    text = build_leaderboard(tmp_path)["markdown"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert "| TruthfulQA MC2 (higher better) |" in header and "| Δ TruthfulQA MC2 |" in header
    assert "MC1" not in header
    cells = row(text, "dpo")
    assert cells[3] == "0.5000 ± {:.4f}".format(mean_and_stderr(DPO_MC[1])[1]) and cells[4].startswith(fmt(difference))
    from harness.report.html import table_data
    from harness.report.labels import Labels

    main, details = table_data(board, Labels(board.records))
    assert [c["label"] for c in main["columns"] if c["key"].startswith("truthfulqa_mc")] == ["TruthfulQA MC2"]
    assert [c["label"] for c in details["columns"] if c["key"] == "delta truthfulqa_mc"] == ["Δ TruthfulQA MC2"]


def test_a_task_score_over_several_metrics_merges_an_items_samples(tmp_path):
    """A config naming both MC1 and MC2: an item's score is the mean of its two samples' (one per subtask), so the
    task's Δ is the mean of MC1's and MC2's differences (−0.25 and +0.25: 0), headed by the task alone."""
    config = {"task_config": {"primary_metrics": ["mc1", "mc2"]}}
    add_truthfulqa(tmp_path, "run0", "start", *START_MC, **config)
    add_truthfulqa(tmp_path, "run1", "dpo", *DPO_MC, **config)
    board = Board(tmp_path)
    dpo, start = ("fixture", "instruct", "dpo"), ("fixture", "instruct", "start")
    assert board.task_score(dpo, "truthfulqa_mc") == pytest.approx(0.25)
    assert board.paired_difference(dpo, start, "truthfulqa_mc")["difference"] == pytest.approx(0.0)
    assert board.paired_difference(dpo, start, "truthfulqa_mc", "mc1")["difference"] == pytest.approx(-0.25)
    header = next(line for line in build_leaderboard(tmp_path)["markdown"].read_text().splitlines()
                  if line.startswith("| variant |"))
    assert "| TruthfulQA MC1 (higher better) |" in header and "| Δ TruthfulQA |" in header
