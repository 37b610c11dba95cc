"""Natively unpaired binary feedback (harness/inputs/data.py, ``format: binary``): loading and validation, the split, the
budget's pair ↔ example rule, KTO's class weights from the counts, the held-out ranking accuracy, and KTO on
``data=toy-binary-feedback`` through the real CLI — pair methods are refused with one line."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from harness.inputs.data import budget_rows, is_binary, load_preference_rows, pair_count, split_data, view_rows
from harness.errors import HarnessError
from harness.records import read_records
from harness.run.registry import CONF_DIR, instantiate
from methods.kto import KTO
from tasks.heldout_preference import binary_ranking_accuracy

TOY = OmegaConf.load(CONF_DIR / "data" / "toy-binary-feedback.yaml")


def test_toy_binary_feedback_loads_splits_and_counts_two_examples_a_pair():
    rows, provenance = load_preference_rows(TOY, None)
    assert provenance == {"source": "toy-binary", "rows": 192, "dropped_mismatched_prompts": 0, "feedback": "binary",
                          "desirable": 64, "undesirable": 128}
    assert is_binary(rows) and rows[0] == {"prompt": [{"role": "user", "content": "Request 0: please describe the sea."}],
                                           "completion": "Certainly, happy to help.", "label": True, "source_row": 1}
    assert len({json.dumps(r["prompt"]) for r in rows}) == 192  # natively unpaired: no prompt twice
    train, heldout = split_data(rows, TOY)
    assert (len(train), len(heldout)) == (160, 32)
    again, _ = split_data(rows, TOY)  # the fixed split seed: the same split every time
    assert [r["source_row"] for r in again] == [r["source_row"] for r in train]
    assert not {r["source_row"] for r in train} & {r["source_row"] for r in heldout}
    # a budget of P pairs trains on the first 2·P examples; the train split holds 160 / 2 = 80 pairs
    assert budget_rows(train, 32) == train[:64] and pair_count(train) == 80


def test_binary_views_refuse_pairs():
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "good", "label": True, "source_row": 1},
            {"prompt": [{"role": "user", "content": "yo"}], "completion": "bad", "label": False, "source_row": 2}]
    assert [(r["completion"], r["label"]) for r in view_rows(rows, "unpaired")] == [("good", True), ("bad", False)]
    assert view_rows(rows, "sft") == [{"prompt": rows[0]["prompt"], "completion": "good"}]  # desirable ones only
    with pytest.raises(HarnessError, match="binary feedback .* has no preference pairs"):
        view_rows(rows, "pairs")


def binary_data_set(tmp_path, lines: list[str]):
    """A ``format: binary`` data config reading ``lines`` from a mirror folder."""
    (tmp_path / "feedback").mkdir()
    (tmp_path / "feedback" / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = OmegaConf.create({"name": "my-feedback", "format": "binary", "mirror_file": "feedback/train.jsonl",
                            "hub_id": "someone/feedback", "hub_split": "train", "heldout_examples": 1, "split_seed": 0})
    return cfg, tmp_path


GOOD = [json.dumps({"prompt": "hi", "completion": "hello", "label": True}),
        json.dumps({"prompt": [{"role": "user", "content": "hi"}],  # TRL's conversational form
                    "completion": [{"role": "assistant", "content": "go away"}], "label": False})]


def test_binary_rows_in_text_and_conversational_form(tmp_path):
    cfg, mirror = binary_data_set(tmp_path, GOOD)
    rows, provenance = load_preference_rows(cfg, mirror)
    assert [(r["prompt"], r["completion"], r["label"], r["source_row"]) for r in rows] == [
        ([{"role": "user", "content": "hi"}], "hello", True, 1), ([{"role": "user", "content": "hi"}], "go away", False, 2)]
    assert provenance["desirable"] == provenance["undesirable"] == 1


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"train\.jsonl:3: not valid JSON"),
    (json.dumps({"prompt": "hi", "completion": "x"}), r"train\.jsonl:3: field 'label' must be true .* got None"),
    (json.dumps({"prompt": "hi", "completion": "x", "label": "yes"}), r"train\.jsonl:3: field 'label' must be true"),
    (json.dumps({"prompt": "hi", "completion": "x", "label": 1}), r"train\.jsonl:3: field 'label' must be true"),
    (json.dumps({"prompt": "hi", "completion": " ", "label": True}), r"train\.jsonl:3: field 'completion' is missing"),
    (json.dumps({"prompt": [{"role": "bot", "content": "hi"}], "completion": "x", "label": True}),
     r"train\.jsonl:3: field 'prompt' must be a string or a list"),
])
def test_bad_binary_row_names_file_row_and_field(tmp_path, bad, message):
    cfg, mirror = binary_data_set(tmp_path, [*GOOD, bad])
    with pytest.raises(HarnessError, match=message) as raised:
        load_preference_rows(cfg, mirror)
    assert "\n" not in str(raised.value)


def test_binary_data_set_needs_its_heldout_key(tmp_path):
    cfg, mirror = binary_data_set(tmp_path, GOOD)
    rows, _ = load_preference_rows(cfg, mirror)
    with pytest.raises(HarnessError, match=r"set data\.heldout_examples=<held-out examples> in conf/data/my-feedback"):
        split_data(rows, OmegaConf.merge(cfg, {"heldout_examples": None}))
    with pytest.raises(HarnessError, match=r"data\.heldout_examples=2 leaves no training examples"):
        split_data(rows, OmegaConf.merge(cfg, {"heldout_examples": 2}))


def test_kto_class_weights_come_from_the_counts():
    rows = [{"label": True}] * 21 + [{"label": False}] * 43
    weights = instantiate("method", "kto", None, params_key="method_params").class_weights(rows)
    # λ_U = 1, λ_D = n_U / n_D = 43 / 21: the weighted ratio λ_D·n_D / (λ_U·n_U) is the paper's lower end, 1
    assert weights == {"desirable_examples": 21, "undesirable_examples": 43, "desirable_weight": pytest.approx(43 / 21),
                       "undesirable_weight": 1.0, "weighted_ratio": 1.0}
    assert KTO(weight_ratio=4 / 3).class_weights(rows)["weighted_ratio"] == pytest.approx(4 / 3, abs=1e-4)
    balanced = KTO().class_weights([{"label": True}, {"label": False}] * 4)  # pairs split into examples: 1 and 1
    assert (balanced["desirable_weight"], balanced["undesirable_weight"]) == (1.0, 1.0)
    fixed = KTO(desirable_weight=3.0).class_weights(rows)  # a weight given is used as given
    assert (fixed["desirable_weight"], fixed["undesirable_weight"]) == (3.0, 1.0)
    with pytest.raises(HarnessError, match="needs desirable and undesirable examples; got 0 and 2"):
        KTO().class_weights([{"label": False}] * 2)


def test_binary_ranking_accuracy_by_hand():
    # desirable scores 3, 1; undesirable 2, 1: of the 4 (desirable, undesirable) pairs 3>2, 3>1 win, 1<2 loses and
    # 1=1 ties (half): A = 2.5 / 4 = .625. Hanley & McNeil: Q1 = .625/1.375, Q2 = 2·.625²/1.625;
    # SE² = [A(1 − A) + (2 − 1)(Q1 − A²) + (2 − 1)(Q2 − A²)] / 4
    area, stderr, outcomes = binary_ranking_accuracy([3.0, 2.0, 1.0, 1.0], [True, False, True, False])
    q1, q2 = .625 / 1.375, 2 * .625 ** 2 / 1.625
    assert area == .625 and stderr == pytest.approx(((.625 * .375 + q1 - .625 ** 2 + q2 - .625 ** 2) / 4) ** .5)
    # per example: desirable 3 beats both (1), undesirable 2 is beaten by one of two (.5), desirable 1 beats
    # half of one and loses the other (.25), undesirable 1 is beaten by one and tied by one (.75); their mean is A
    assert outcomes == [1.0, .5, .25, .75] and sum(outcomes) / 4 == area
    with pytest.raises(HarnessError, match="0 desirable and 2 undesirable"):
        binary_ranking_accuracy([1.0, 2.0], [False, False])


TINY = ["model=tiny-random", "data=toy-binary-feedback", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]"]


def test_kto_trains_on_binary_feedback_through_the_cli(tmp_path, cache_dir):
    result = run_cli("sweep", *TINY, "methods=[kto]", "tasks=[heldout_preference]",
                     "+method_params.kto.learning_rate=1e-3", f"paths.results={tmp_path}", "name=b", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "b")}
    assert set(records) == {"start", "kto"} and all(r["status"] == "ok" for r in records.values())
    kto = records["kto"]
    assert kto["data"]["feedback"] == "binary" and kto["run_config"]["data"]["format"] == "toy-binary"
    consumed = kto["consumed"]
    # budget=toy: 32 pairs = 64 examples, 8 optimizer steps of 4 pairs (8 examples) — as KTO on 32 preference pairs
    assert (consumed["examples"], consumed["pairs"], consumed["optimizer_steps"]) == (64, 32, 8)
    weights = consumed["class_weights"]
    assert weights["desirable_examples"] + weights["undesirable_examples"] == 64
    assert weights["desirable_examples"] < weights["undesirable_examples"]  # one desirable in three
    assert weights["desirable_weight"] == pytest.approx(weights["undesirable_examples"] / weights["desirable_examples"])
    assert weights["weighted_ratio"] == pytest.approx(1.0)
    assert consumed["kl_pairs_sharing_prompt"] == 0  # every KL completion meets another prompt (methods/kto.py)
    # held out: 32 examples (8 desirable); the trained implicit reward ranks desirable above undesirable
    details = kto["task_details"]
    assert (details["examples"], details["desirable"], details["undesirable"]) == (32, 8, 24)
    logratio = kto["metrics"]["logratio_accuracy"]["value"]
    start_avg = records["start"]["metrics"]["avg_logp_accuracy"]["value"]
    assert logratio > 0.75, kto["metrics"]
    assert kto["metrics"]["avg_logp_accuracy"]["value"] > start_avg, (kto["metrics"], start_avg)


@pytest.mark.parametrize("override, message", [
    ("methods=[dpo]", "and has no preference pairs; method 'dpo' trains on pairs: use an unpaired method (kto)"),
    ("budget.match=flops", "budget.match=flops measures against a pair method: set budget.match=examples"),
    ("tune.trials=2", "tune.trials selects by held-out pair accuracy: set tune.trials=0"),
    ("budget.pairs=81", "budget.pairs=81 but toy-binary-feedback has only 80 training pairs"),
])
def test_what_needs_pairs_is_refused_on_binary_feedback_in_one_line(tmp_path, cache_dir, override, message):
    arguments = ["methods=[kto]", override] if not override.startswith("methods") else [override]
    result = run_cli("sweep", *TINY, *arguments, f"paths.results={tmp_path}", "name=b", cache=cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("align-harness: error: data set toy-binary-feedback is binary feedback") or \
        last.startswith("align-harness: error: budget "), last
    assert message in last, last
    assert not (tmp_path / "b" / "records.jsonl").exists()
