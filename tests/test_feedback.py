"""AI feedback (harness/train/feedback.py): a judge relabels the training pairs before any method trains. The tie and
refill rules and the agreement with the human labels by hand on a scripted judge; then through the real CLI on
tiny-random with the local_hf judge on a tiny random model: the labels are the judge's, the judgments are cached
and reused, and the record names the feedback source."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from harness.errors import HarnessError
from harness.train.feedback import Feedback, conversation_text, feedback_from_config, label_pairs
from harness.evaluate.judges import Judgment
from harness.records import read_records

# P(chosen better) the scripted judge gives each pair, by its chosen text: agree, tie, disagree, agree, tie, agree
SCRIPT = {"c0": 0.9, "c1": 0.5, "c2": 0.1, "c3": 0.7, "c4": 0.5, "c5": 0.8}


class ScriptedJudge:
    type = "scripted"

    def __init__(self):
        self.asked = 0

    def identity(self) -> dict:
        return {"type": self.type, "script": SCRIPT}

    def judge_batch(self, items):
        self.asked += len(items)
        return [Judgment(probability=SCRIPT[first], output_1_first=SCRIPT[first], output_1_second=0.5, method="script")
                for _, first, _ in items]


def scripted_rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"q{k}"}], "chosen": f"c{k}", "rejected": "r", "source_row": k + 1}
            for k in range(6)]


def test_ties_are_dropped_and_refilled_and_agreement_is_counted_by_hand(tmp_path):
    judge = ScriptedJudge()
    feedback = Feedback(name="scripted", judge_config={"type": "scripted"}, judge=judge, batch_size=2)
    labelled = label_pairs(scripted_rows(), feedback, needed=3, cache_dir=tmp_path, purpose="training")
    # c0 kept, c1 a tie (dropped), c2 swapped; one pair short → the next row (c3) is judged and kept
    assert [(r["chosen"], r["rejected"]) for r in labelled.rows] == [("c0", "r"), ("r", "c2"), ("c3", "r")]
    assert [i["label"] for i in labelled.items] == ["1", "0", "2", "1"] and judge.asked == 4
    summary = labelled.summary
    assert (summary["pairs_judged"], summary["pairs_kept"], summary["flipped"], summary["tied"]) == (4, 3, 1, 1)
    # agreement per pair 1, ½, 0, 1: mean .625; stderr = sqrt(Σ(v − .625)² / 3 / 4) = sqrt(.6875 / 12)
    assert summary["agreement_with_human"]["value"] == pytest.approx(0.625)
    assert summary["agreement_with_human"]["stderr"] == pytest.approx((0.6875 / 12) ** 0.5)
    # the second order says 0.5 for every pair: consistent only with the tie
    assert summary["position_consistency"]["value"] == pytest.approx(0.25)
    assert summary["cache"] == "miss" and len(summary["cache_keys"]) == 2

    again = label_pairs(scripted_rows(), feedback, needed=3, cache_dir=tmp_path, purpose="training")
    assert again.rows == labelled.rows and again.summary["cache"] == "hit" and judge.asked == 4  # not asked again

    kept = label_pairs(scripted_rows(), Feedback(name="scripted", judge_config={"type": "scripted"}, judge=judge,
                                                 ties="keep"), needed=3, cache_dir=tmp_path, purpose="training")
    assert [(r["chosen"], r["rejected"]) for r in kept.rows] == [("c0", "r"), ("c1", "r"), ("r", "c2")]
    assert kept.summary["tied_kept"] == 1

    with pytest.raises(HarnessError, match="only 4 of the 6 needed remain"):
        label_pairs(scripted_rows(), feedback, needed=6, cache_dir=tmp_path, purpose="training")


def test_feedback_config_is_checked_before_any_work():
    assert feedback_from_config(None).is_human and feedback_from_config({"name": "human", "judge": None}).is_human
    assert feedback_from_config({"name": "human", "judge": None}).identity() is None
    with pytest.raises(HarnessError, match="unknown judge type 'nope'"):
        feedback_from_config({"judge": {"type": "nope"}})
    with pytest.raises(HarnessError, match=r"feedback.draw_margin=0.7 must be a number in \[0, 0.5\)"):
        feedback_from_config({"judge": {"type": "local_hf", "model": "tiny-random:3"}, "draw_margin": 0.7})
    with pytest.raises(HarnessError, match="set feedback.judge.model="):
        feedback_from_config({"judge": {"type": "reward_model", "model": None}})
    assert conversation_text([{"role": "user", "content": "hi"}]) == "hi"
    assert conversation_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]) == "Human: a\n\nAssistant: b\n\nHuman: c"


# HH-harmless pairs (the toy set's pairs are all alike: a judge agrees with all or none of them)
FEEDBACK_SWEEP = [
    "model=tiny-random", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "include_start=false", "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4", "methods=[dpo]",
    "budget.pairs=8", "tune.trials=1", "tune.heldout_pairs=4",
]
JUDGE = ["feedback=local-judge", "feedback.judge.model=tiny-random:3"]


def test_ai_feedback_labels_the_pairs_is_cached_and_recorded(tmp_path, cache_dir):
    first = run_cli("sweep", *FEEDBACK_SWEEP, *JUDGE, f"paths.results={tmp_path}", "name=a", cache=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    (record,) = read_records(tmp_path / "a")
    assert record["status"] == "ok", record["reason"]
    feedback = record["feedback"]
    assert feedback["source"] == "judge" and feedback["judge"]["type"] == "local_hf"
    assert feedback["judge"]["model"] == "tiny-random:3" and feedback["ties"] == "drop"
    assert feedback["pairs_kept"] == 8 and feedback["pairs_judged"] == 8 + feedback["tied"]
    assert 0 <= feedback["agreement_with_human"]["value"] <= 1 and feedback["agreement_with_human"]["stderr"] is not None
    assert feedback["cache"] == "miss" and feedback["judge_prompt_tokens"] > 0
    assert feedback["selection"]["pairs_judged"] == 4  # the tuning selection pairs are labelled by the judge too
    assert record["run_config"]["feedback"]["judge"]["model"] == "tiny-random:3"
    assert record["consumed"]["pairs"] == 8 and record["tuning"]["trials"][0]["status"] == "ok"

    # the labels are the judge's: ask the same judge here, pair by pair
    from harness.evaluate.judges import build_judge, preference_label

    items = [json.loads(line) for line in (tmp_path / "a" / feedback["file"]).read_text().splitlines()]
    assert len(items) == feedback["pairs_judged"]
    judge = build_judge({"type": "local_hf", "model": "tiny-random:3", "max_output_chars": 1000})
    judged = judge.judge_batch([(conversation_text(i["prompt"]), i["human_chosen"], i["human_rejected"]) for i in items])
    for item, judgment in zip(items, judged):
        assert item["probability"] == pytest.approx(judgment.probability, abs=1e-5)
        assert item["label"] == preference_label(judgment.probability, 0.0)
        assert item["flipped"] == (judgment.probability < 0.5) and item["kept"] == (item["label"] != "0")
    assert sum(i["flipped"] for i in items) == feedback["flipped"]
    assert 0 < feedback["flipped"] < feedback["pairs_judged"]  # this random judge agrees on some pairs, not on others
    agree = [1.0 if i["label"] == "1" else 0.0 if i["label"] == "2" else 0.5 for i in items]
    assert feedback["agreement_with_human"]["value"] == pytest.approx(sum(agree) / len(agree))

    # a rerun into another folder: the judgments come from the cache, the checkpoint from its run id
    second = run_cli("sweep", *FEEDBACK_SWEEP, *JUDGE, f"paths.results={tmp_path}", "name=b", cache=cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    (again,) = read_records(tmp_path / "b")
    assert again["feedback"]["cache"] == "hit" and again["feedback"]["selection"]["cache"] == "hit"
    assert again["run_id"] == record["run_id"] and "judged (hit)" in second.stdout + second.stderr

    # human feedback: the data set's labels, a different run
    human = run_cli("sweep", *FEEDBACK_SWEEP, f"paths.results={tmp_path}", "name=c", cache=cache_dir)
    assert human.returncode == 0, human.stderr[-3000:]
    (plain,) = read_records(tmp_path / "c")
    assert plain["status"] == "ok" and plain["feedback"] == "human" and "feedback" not in plain["run_config"]
    assert plain["run_id"] != record["run_id"]


def test_an_unknown_feedback_is_one_line(tmp_path, cache_dir):
    result = run_cli("sweep", "model=tiny-random", "feedback=nope", f"paths.results={tmp_path}", cache=cache_dir)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("align-harness: error: unknown feedback 'nope'")
