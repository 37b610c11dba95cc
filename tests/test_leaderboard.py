"""The leaderboard from a fixture set of records: golden Markdown and CSV, unified score, paired
bootstrap, LaTeX, and the HTML page in headless Chromium (sorting, row count, escaped model text).

Regenerate the golden files after an intended change: UPDATE_GOLDEN=1 python -m pytest tests/test_leaderboard.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from harness.report.leaderboard import Board, build_leaderboard, compare, paired_bootstrap
from harness.records import append_record, write_samples

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
    toxicity = next(r for r in rows if r["setting"] == "instruct" and r["task"] == "toxicity")
    assert toxicity["difference"] == pytest.approx(0.5)  # mapped toxicity: dpo 0.75, kto 0.25
    bad = run_cli("leaderboard", str(board_folder), "--compare", "dpo", "nope", cache=cache_dir)
    assert bad.returncode == 2 and "no setting has both 'dpo' and 'nope'" in bad.stderr


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
    main_header = next(line for line in text.splitlines() if line.startswith("| method | unified"))
    assert "group=women" not in main_header and "toxicity/toxic_share" in main_header
    assert "### fixture · instruct: breakdowns" in text
    assert "| toxicity/toxic_share/group=women | 0.5000 ± 0.2500 | 0.5000 ± 0.2500 | 0.5000 ± 0.2500 |" in text
    assert "group=women" not in outputs["latex"].read_text()
    assert "toxicity/toxic_share/group=women" in outputs["csv"].read_text().splitlines()[0]


def test_published_rows_come_from_an_experiment_config(board_folder, cache_dir):
    result = run_cli("leaderboard", str(board_folder), "--experiment", "simpo-mistral-instruct", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    text = (board_folder / "leaderboard.md").read_text()
    assert "Published reference numbers" in text and "Meng et al. 2024 (SimPO)" in text


def test_plots_are_written_as_png_and_svg(board_folder):
    build_leaderboard(board_folder)
    for name in ("tasks", "heatmap", "curves"):
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
        methods = lambda: [rows.nth(i).locator("td").nth(2).inner_text() for i in range(rows.count())]
        page.locator("#leaderboard th[data-column='unified_score']").click()
        scores = [rows.nth(i).locator("td").nth(3).inner_text() for i in range(rows.count())]
        numbers = [float(s) for s in scores if s != "—"]
        assert numbers == sorted(numbers)
        page.locator("#leaderboard th[data-column='unified_score']").click()
        numbers = [float(rows.nth(i).locator("td").nth(3).inner_text()) for i in range(rows.count())
                   if rows.nth(i).locator("td").nth(3).inner_text() != "—"]
        assert numbers == sorted(numbers, reverse=True)
        page.select_option("#filter-setting", "sft")
        assert set(methods()) == {"start", "dpo", "kto"}
        assert page.title() != "pwned"                  # the model's <script> did not run
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
        breakdown = "#leaderboard th[data-column='toxicity/toxic_share/group=women']"
        assert page.locator(breakdown).count() == 0 and page.locator(
            "#leaderboard th[data-column='toxicity/toxic_share']").count() == 1
        page.locator("#show-breakdowns").check()
        assert page.locator(breakdown).count() == 1
        browser.close()
