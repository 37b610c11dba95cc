"""Issue 14 item 4, honest judges: the win-rate records carry their judge's check against GPT-4 (computed once, kept in
the cache, reused by the task and filled by ``judge-check``); a column whose judge is below the better of the length
and constant baselines (or unchecked) is marked on every export with a footnote and, below baseline, left out of the
unified score unless ``count_below_baseline_judge: true``; the ``likelihood`` judge on the tiny model.

Synthetic records for the leaderboard; the tiny random Llama for the judges; the mirror's annotations (a few pairs).
"""

from __future__ import annotations

import json

from harness.report.html import table_data
from harness.report.labels import Labels
import math
from pathlib import Path

import pytest

from conftest import DATA_MIRROR
from harness.errors import HarnessError
from harness.evaluate.judges import (JUDGE_CHECK_FOLDER, Judgment, LikelihoodJudge, build_judge, cached_judge_check,
                                     judge_agreement, read_gpt4_annotations, run_judge_check)
from harness.protocols import Checkpoint, TaskContext
from harness.records import append_record, write_samples
from harness.report.board import JUDGE_MARK, Board, table_rows
from harness.report.leaderboard import build_leaderboard, csv_text, latex, markdown
from tasks.win_rate import WinRate

ANNOTATIONS = DATA_MIRROR / "alpaca_eval" / "annotations_gpt4"
needs_mirror = pytest.mark.skipif(not ANNOTATIONS.is_dir(), reason=f"offline data mirror not found at {DATA_MIRROR}")


class CountingJudge:
    """Prefers output_2 with p = 0.2 and counts what it was asked."""

    type = "counting"

    def __init__(self):
        self.asked = 0

    def identity(self) -> dict:
        return {"type": self.type, "model": "counting"}

    def judge_batch(self, items):
        self.asked += len(items)
        return [Judgment(probability=0.2, output_1_first=0.2, output_1_second=0.2, method="fake") for _ in items]


# -- the check, cached ---------------------------------------------------------------------------
@needs_mirror
def test_judge_check_is_computed_once_and_reused(tmp_path):
    judge = CountingJudge()
    first = cached_judge_check(judge, data_mirror=DATA_MIRROR, cache_root=tmp_path, pairs=6)
    assert judge.asked == 6
    # by hand: the judge always names output_2; GPT-4's verdicts on the same six pairs
    gpt4 = [r["gpt4"] for r in read_gpt4_annotations(DATA_MIRROR, 6)]
    agreement = sum(1.0 if g == "2" else 0.5 if g == "0" else 0.0 for g in gpt4) / 6
    expected = judge_agreement(CountingJudge(), read_gpt4_annotations(DATA_MIRROR, 6), draw_margin=0.0)
    assert first["status"] == "checked" and first["pairs"] == 6
    assert first["agreement"] == pytest.approx(agreement)
    baselines = {"longer_output": expected["baseline_longer_output"],
                 "always_reference": expected["baseline_always_reference"]}
    assert first["baselines"] == pytest.approx(baselines)
    assert first["best_baseline"] == max(baselines.values()) and first["baseline_name"] == max(baselines, key=baselines.get)
    assert first["below_baseline"] is (first["agreement"] < first["best_baseline"])
    again = cached_judge_check(judge, data_mirror=DATA_MIRROR, cache_root=tmp_path, pairs=6)
    assert judge.asked == 6 and again == first  # read from the cache, not judged again
    assert len(list((tmp_path / JUDGE_CHECK_FOLDER).glob("*.json"))) == 1
    cached_judge_check(judge, data_mirror=DATA_MIRROR, cache_root=tmp_path, pairs=4)  # other pairs: another entry
    assert judge.asked == 10 and len(list((tmp_path / JUDGE_CHECK_FOLDER).glob("*.json"))) == 2


def test_without_annotations_the_judge_is_unchecked(tmp_path):
    judge = CountingJudge()
    no_mirror = cached_judge_check(judge, data_mirror=None, cache_root=tmp_path)
    assert no_mirror["status"] == "unchecked" and "no data mirror" in no_mirror["reason"]
    empty = cached_judge_check(judge, data_mirror=tmp_path, cache_root=tmp_path)
    assert empty["status"] == "unchecked" and str(tmp_path / "alpaca_eval" / "annotations_gpt4") in empty["reason"]
    off = cached_judge_check(judge, data_mirror=DATA_MIRROR, cache_root=tmp_path, pairs=0)
    assert off["status"] == "unchecked" and "judge_check_pairs=0" in off["reason"]
    assert judge.asked == 0
    with pytest.raises(HarnessError, match="judge_check_pairs=-1 must be a whole number >= 0"):
        WinRate(judge_check_pairs=-1)


@needs_mirror
def test_judge_check_cli_result_is_what_the_task_reads(tmp_path, tiny_model):
    """``judge-check --limit N`` keeps its result where the task with ``judge_check_pairs: N`` looks first."""
    report = run_judge_check({"judge": {"type": "local_hf", "model": str(tiny_model), "max_output_chars": 1000}},
                             limit=4, data_mirror=str(DATA_MIRROR), cache_root=tmp_path)
    assert "BELOW the better baseline" in report or "not below the better baseline" in report

    class Refusing:  # the tiny judge as the task would build it, refusing to judge: the check must come from the cache
        def __init__(self):
            self.inner = build_judge({"type": "local_hf", "model": str(tiny_model), "max_output_chars": 1000})
            self.type = self.inner.type

        def identity(self):
            return self.inner.identity()

        def judge_batch(self, items):
            raise AssertionError("judged again")

    check = cached_judge_check(Refusing(), data_mirror=DATA_MIRROR, cache_root=tmp_path, pairs=4)
    assert check["status"] == "checked" and check["pairs"] == 4
    assert f"agrees with GPT-4 {check['agreement']:.3f} vs {check['best_baseline']:.3f}" in report


@needs_mirror
def test_win_rate_record_carries_the_judge_check(tmp_path, tiny_model, varied_tiny_model):
    task = WinRate(limit=2, max_new_tokens=4, judge={"type": "local_hf", "model": str(tiny_model)}, judge_check_pairs=4)
    context = TaskContext(data_mirror=DATA_MIRROR, cache_dir=tmp_path / "tasks", device="cpu", batch_size=8,
                          show_progress=False, cache_root=tmp_path)
    checkpoint = Checkpoint(path=varied_tiny_model, setting="instruct", use_chat_template=True, reference_path=tiny_model)
    result = task.evaluate(checkpoint, context)
    check = result.details["judge_check"]
    assert check["status"] == "checked" and check["pairs"] == 4
    assert {"agreement", "best_baseline", "baseline_name", "pairs", "below_baseline"} <= set(check)
    assert check["judge"] == task._judge.identity()
    assert result.details["seconds"]["judge_check"] >= 0
    json.dumps(result.details)
    # the start row asks no judge and checks none
    start = task.evaluate(Checkpoint(path=tiny_model, setting="instruct", use_chat_template=True), context)
    assert "judge_check" not in start.details


# -- the likelihood judge -------------------------------------------------------------------------
def test_likelihood_judge_by_hand(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = build_judge({"type": "likelihood", "model": str(tiny_model),
                         "weights": {"mean_logprob": 0.7, "mean_pmi": -0.3, "log_chars": 0.5}}, batch_size=2)
    assert isinstance(judge, LikelihoodJudge)
    items = [("Name a primary color.", "Red.", "Blue is one."), ("Say hello.", "Hello!", "")]
    judgments = judge.judge_batch(items)
    swapped = judge.judge_batch([(i, b, a) for i, a, b in items])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def logprob(instruction: str, output: str) -> tuple[float, int]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                               add_generation_prompt=True)
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([context + answer])).logits[0].log_softmax(-1)
        return sum(float(logits[len(context) - 1 + k, t]) for k, t in enumerate(answer)), len(answer)

    for (instruction, a, b), judgment, mirror in zip(items, judgments, swapped):
        features = {}
        for name, output in (("output_1", a), ("output_2", b)):
            conditional, tokens = logprob(instruction, output)
            unconditional, _ = logprob("", output)
            features[name] = {"mean_logprob": conditional / tokens, "mean_pmi": (conditional - unconditional) / tokens,
                              "log_chars": math.log1p(len(output))}
            for key, value in features[name].items():
                assert judgment.raw[name][key] == pytest.approx(value, abs=1e-4)
        z = sum(w * (features["output_1"][k] - features["output_2"][k]) for k, w in
                {"mean_logprob": 0.7, "mean_pmi": -0.3, "log_chars": 0.5}.items())
        assert judgment.probability == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-5)
        assert judgment.probability == pytest.approx(1 - mirror.probability, abs=1e-9)  # no position bias
        assert judgment.consistent(0.0) and judgment.method == "likelihood"
    with pytest.raises(HarnessError, match="judge.weights.length is not a feature of the likelihood judge"):
        build_judge({"type": "likelihood", "weights": {"length": 1.0}})
    with pytest.raises(HarnessError, match="every weight is 0"):
        build_judge({"type": "likelihood", "weights": {"log_chars": 0}})


@needs_mirror
def test_judge_check_of_the_likelihood_judge_on_a_few_pairs(tmp_path, tiny_model):
    report = run_judge_check({"judge": {"type": "local_hf"}}, judge_type="likelihood",
                             overrides={"model": str(tiny_model)}, limit=4, data_mirror=str(DATA_MIRROR),
                             cache_root=tmp_path)
    assert "judge: likelihood" in report and "pairs: 4 " in report and "agreement with GPT-4: " in report
    assert "position consistency: 1.000" in report  # order-free by construction
    assert "baseline on 4 pairs" in report


# -- the leaderboard: marks and the unified score ------------------------------------------------------
def add(folder: Path, run_id: str, method: str, task: str, metric: str, values: list[float], **fields) -> None:
    samples = [{"item_id": str(i), "scores": {metric: v}} for i, v in enumerate(values)]
    n = len(values)
    mean = sum(values) / n
    stderr = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
    metrics = {metric: {"value": mean, "stderr": stderr, "higher_is_better": True}}
    if task == "win_rate":  # what the win-rate-against-length plot reads
        metrics["mean_output_chars"] = {"value": 100.0 + len(run_id), "stderr": 5.0, "higher_is_better": False}
    append_record(folder, {"run_id": run_id, "sweep": "fixture", "family": "fixture", "setting": "instruct",
                           "method": method, "variant": method, "task": task, "task_key": f"{task}-{run_id}",
                           "measurement_key": f"m-{task}", "status": "ok", "reason": None, "consumed": {},
                           "metrics": metrics,
                           "task_config": {"primary_metrics": [metric], **fields.pop("task_config", {})},
                           "samples_file": write_samples(folder, run_id, f"{task}-{run_id}", samples), **fields})


BELOW = {"status": "checked", "agreement": 0.438, "agreement_stderr": 0.089, "best_baseline": 0.781,
         "baseline_name": "longer_output", "baselines": {"longer_output": 0.781, "always_reference": 0.719},
         "pairs": 32, "below_baseline": True, "judge": {"type": "local_hf", "model": "embedded:smollm2-135m-instruct"}}
ABOVE = {**BELOW, "agreement": 0.812, "below_baseline": False}


def fixture(folder: Path, check: dict | None, **task_config) -> Board:
    for run_id, method, mc1, wins in (("r0", "start", [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]),
                                      ("r1", "dpo", [1, 1, 0, 0], [1, 1, 1, 0])):
        add(folder, run_id, method, "truthfulqa_mc", "mc1", mc1)
        details = {} if check is None or method == "start" else {"judge_check": check}
        add(folder, run_id, method, "win_rate", "win_rate", wins, task_details=details, task_config=task_config)
    return Board(folder)


DPO = ("fixture", "instruct", "dpo")


def test_below_baseline_judge_is_marked_everywhere_and_left_out_of_the_unified_score(tmp_path, monkeypatch):
    board = fixture(tmp_path, BELOW)
    assert board.excluded_tasks == ["win_rate"] and board.unified_tasks() == ["truthfulqa_mc"]
    assert board.unified(DPO) == (0.5, 1)  # truthfulqa only; with win_rate it would be (0.5 + 0.75) / 2
    warning = board.judge_warning("win_rate")
    assert warning == ("win_rate: its judge (local_hf embedded:smollm2-135m-instruct) agrees with GPT-4 0.438 vs 0.781 "
                       "for the longer output baseline on 32 pairs: below the better baseline; left out of the unified "
                       "score")
    assert board.judge_warning("truthfulqa_mc") is None
    unified = board.unified_difference(DPO, ("fixture", "instruct", "start"))
    assert unified["difference"] == pytest.approx(0.25) and unified["items"] == 4  # truthfulqa's items only

    text = markdown(board)
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert f"Win rate {JUDGE_MARK}" in header and f"Δ Win rate {JUDGE_MARK}" in header  # labels (harness.report.labels)
    assert f"MC1 {JUDGE_MARK}" not in header and f"TruthfulQA {JUDGE_MARK}" not in header
    assert f"{JUDGE_MARK} {warning}" in text.splitlines()
    assert f"| Win rate {JUDGE_MARK} (higher better) |" in text  # the per-metric Δ table too

    csv = csv_text(board)
    assert f"judge_warning win_rate" in csv.splitlines()[0] and csv.count(warning) == 2  # both rows' cells
    rows = {row["variant"]: row for row in table_rows(board)}
    assert rows["dpo"]["judge_warning win_rate"] == warning and rows["dpo"]["unified_score"] == 0.5

    tex = latex(board)
    assert "Win rate\\textsuperscript{\\dag}" in tex and "MC1\\textsuperscript{\\dag}" not in tex
    assert "\\par\\footnotesize \\dag{} win\\_rate: its judge" in tex

    import harness.report.plots as plots

    figures, save = {}, plots._save

    def keep_texts(figure, folder, name):  # what each figure shows in words: footnotes and panel titles
        figures[name] = [t.get_text() for t in figure.texts] + [a.get_title() for a in figure.axes]
        return save(figure, folder, name)

    monkeypatch.setattr(plots, "_save", keep_texts)
    outputs = build_leaderboard(tmp_path)
    for name in ("tasks", "heatmap", "win_rate_vs_length", "forest"):
        assert f"{JUDGE_MARK} {warning}" in figures[name], name  # the footnote under every figure
    assert any(title.startswith(f"Win rate {JUDGE_MARK}") for title in figures["tasks"])
    assert any(title == f"Win rate {JUDGE_MARK}" for title in figures["forest"])
    assert any(title.endswith(JUDGE_MARK) for title in figures["win_rate_vs_length"])

    page = outputs["html"].read_text()
    assert f'<p class="judge-warning">{JUDGE_MARK} {warning}</p>' in page
    main, details = table_data(board, Labels(board.records))   # the page's tables, built server-side
    assert [c["label"] for c in main["columns"] if JUDGE_MARK in c["label"]] == [f"Win rate {JUDGE_MARK}"]
    assert {c["title"] for c in details["columns"] if JUDGE_MARK in c["label"]} == {
        "win_rate/win_rate", "win_rate/mean_output_chars"}  # every column of the task, none of the others


def test_count_below_baseline_judge_keeps_it_in_the_unified_score_still_marked(tmp_path):
    board = fixture(tmp_path, BELOW, count_below_baseline_judge=True)
    assert board.excluded_tasks == [] and board.unified(DPO) == (pytest.approx(0.625), 2)
    assert board.judge_warning("win_rate").endswith("counted in the unified score (count_below_baseline_judge: true)")
    assert f"Win rate {JUDGE_MARK}" in markdown(board)


def test_a_judge_above_baseline_is_not_marked_and_counts(tmp_path):
    board = fixture(tmp_path, ABOVE)
    assert board.excluded_tasks == [] and board.unified(DPO) == (pytest.approx(0.625), 2)
    assert board.judge_warning("win_rate") is None and JUDGE_MARK not in markdown(board)
    assert "judge_warning win_rate" not in csv_text(board) and "\\dag" not in latex(board)


def test_an_unchecked_judge_is_marked_and_counts(tmp_path):
    board = fixture(tmp_path, {"status": "unchecked", "reason": "no data mirror: the GPT-4 annotations to check the "
                                                              "judge against are not available here"})
    assert board.excluded_tasks == [] and board.unified(DPO) == (pytest.approx(0.625), 2)
    assert board.judge_warning("win_rate") == ("win_rate: its judge was not checked against GPT-4 (no data mirror: the "
                                               "GPT-4 annotations to check the judge against are not available here)")
    assert f"Win rate {JUDGE_MARK}" in markdown(board)


def test_records_without_a_judge_check_are_not_marked(tmp_path):
    board = fixture(tmp_path, None)
    assert board.excluded_tasks == [] and board.judge_warning("win_rate") is None


def test_counting_a_weak_judge_is_display_only_and_the_likelihood_judge_is_in_the_score_key():
    from test_run_spec import tiny_sweep

    def key(*overrides):
        sweep = tiny_sweep(*overrides, tasks="[win_rate]")
        return sweep.score_key("win_rate", "run-a"), sweep.task_configs["win_rate"]

    base, config = key()
    counted, counted_config = key("+task_params.win_rate.count_below_baseline_judge=true")
    assert counted.value == base.value  # the leaderboard reads it from the record's task_config; nothing rescores
    assert config["count_below_baseline_judge"] is False and counted_config["count_below_baseline_judge"] is True
    assert key("+task_params.win_rate.judge.type=likelihood")[0].value != base.value
