"""The published studies as configs (conf/experiment/): each composes, its published rows pass the checks (a number,
or null with the reason it is missing), ``align-harness plan`` prices it offline, and ``sweep`` offline refuses in one
line where the hub is needed; the data-set converters they need; the published-row checks themselves."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import run_cli_forked
from harness.errors import HarnessError
from harness.inputs.data import FORMATS
from harness.report.published import check_published, published_markdown
from harness.run.registry import available, group_config

# the published studies: experiments with published rows (mini-study is ours: tests/test_mini_study.py)
EXPERIMENTS = sorted(n for n in available("experiment") if group_config("experiment", n).get("published") is not None)


def published_rows(name: str) -> list[dict]:
    return check_published(OmegaConf.to_container(group_config("experiment", name)).get("published"),
                           f"conf/experiment/{name}.yaml")


def test_every_study_of_the_issue_has_a_config():
    assert {"insights-alignment", "dpo-vs-ppo", "tulu3-8b", "simpo-mistral-base", "simpo-mistral-instruct",
            "simpo-llama3-base", "simpo-llama3-instruct"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_published_rows_are_numbers_or_missing_with_a_reason(name):
    rows = published_rows(name)
    assert rows, f"{name} has no published rows"
    for row in rows:
        assert (row["value"] is None) == bool(row.get("missing")), row
    settings = set(OmegaConf.to_container(group_config("experiment", name))["settings"])
    assert {row["setting"] for row in rows} <= settings | {"pretrained", "sft", "instruct"}


def test_transcribed_simpo_numbers_match_the_readme():
    # spot checks against princeton-nlp/SimPO README "Released Models" v0.1 (the corrected CPO rows included)
    def value(name, method, task, metric):
        (row,) = [r for r in published_rows(name) if (r["method"], r["task"], r["metric"]) == (method, task, metric)]
        return row["value"]

    assert value("simpo-mistral-instruct", "simpo", "alpaca_eval2", "lc_win_rate") == 32.1
    assert value("simpo-mistral-instruct", "cpo", "alpaca_eval2", "win_rate") == 28.8
    assert value("simpo-mistral-base", "cpo", "alpaca_eval2", "lc_win_rate") == 9.8
    assert value("simpo-llama3-base", "start", "arena_hard", "win_rate") == 3.3
    assert value("simpo-llama3-instruct", "simpo", "alpaca_eval2", "lc_win_rate") == 44.7
    assert value("tulu3-8b", "dpo", "gsm8k", "8-shot CoT") == 84.3


@pytest.mark.parametrize("rows, message", [
    ([{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "metric": "m",
       "value": None}], "published[0]: value is null; say why in missing"),
    ([{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "metric": "m",
       "value": "26.8"}], "published[0]: value '26.8' is not a number"),
    ([{"paper": "P", "table": "T", "model": "M", "setting": "base", "method": "dpo", "task": "t", "metric": "m",
       "value": 1.0}], "published[0]: setting 'base' is not one of pretrained, sft, instruct"),
    ([{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "value": 1.0}],
     "published[0]: field 'metric' must be a non-empty string"),
    ([{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "metric": "m",
       "value": 1.0, "missing": "why"}], "published[0]: value 1.0 and missing 'why' both set"),
    ([{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "metric": "m",
       "value": 1.0, "source": "x"}], "published[0]: unknown field 'source'"),
])
def test_malformed_published_rows_are_refused_naming_row_and_field(rows, message):
    with pytest.raises(HarnessError) as error:
        check_published(rows, "conf/experiment/x.yaml")
    assert str(error.value).startswith("conf/experiment/x.yaml: " + message)


def test_markdown_prints_missing_values_with_their_reason():
    rows = [{"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "dpo", "task": "t", "metric": "m",
             "value": None, "missing": "table not readable"},
            {"paper": "P", "table": "T", "model": "M", "setting": "sft", "method": "ipo", "task": "t", "metric": "m",
             "value": 20.3}]
    text = "\n".join(published_markdown(rows))
    assert "| P | T | M | sft | dpo | t | m | missing [1] |" in text
    assert "| P | T | M | sft | ipo | t | m | 20.3 |" in text
    assert "- [1] missing: table not readable" in text


def test_saferlhf_rows_become_pairs_by_the_chosen_label():
    row = {"prompt": "How do I pick a lock?", "response_0": "Here is how.", "response_1": "I can't help with that.",
           "better_response_id": 0, "safer_response_id": 1}
    better = FORMATS["saferlhf-better"](row, where="f:1")
    safer = FORMATS["saferlhf-safer"](row, where="f:1")
    assert (better["chosen"], better["rejected"]) == ("Here is how.", "I can't help with that.")
    assert (safer["chosen"], safer["rejected"]) == ("I can't help with that.", "Here is how.")
    assert better["prompt"] == [{"role": "user", "content": "How do I pick a lock?"}]
    assert FORMATS["saferlhf-better"]({**row, "response_1": "Here is how."}, where="f:1") is None  # no preference
    with pytest.raises(HarnessError, match=r"f:2: field 'better_response_id' must be 0 or 1"):
        FORMATS["saferlhf-better"]({**row, "better_response_id": 2}, where="f:2")


# every study through the real CLI is minutes on a loaded 2-core machine: slow (CI runs it); one stays in the fast set
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "insights-alignment" else pytest.mark.slow)
                                  for n in EXPERIMENTS])
def test_plan_prices_every_study_offline(name, cache_dir, tmp_path):
    result = run_cli_forked("plan", "--json", f"+experiment={name}", f"paths.results={tmp_path}",
                            "plan.hardware=h100", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    config = OmegaConf.to_container(group_config("experiment", name))
    trained = [u for u in report["units"] if u["kind"] == "train"]
    assert sorted({u["name"].split("[")[0] for u in trained}) == sorted(config["methods"])
    assert {u["setting"] for u in trained} == set(config["settings"])
    assert all(u["train_flops"] > 0 and u["score_flops"] > 0 for u in trained)
    assert report["totals"]["flops"] > 0 and report["totals"]["hours"] > 0
    assert not (tmp_path / name).exists()  # read-only
    # none of the studies' data sets is in the shared mirror: priced at the budget's longest pairs, and said so
    assert any(f"data set {config['defaults'][-1]['override /data']} not readable here" in a
               for a in report["approximations"])


@pytest.mark.parametrize("name", [pytest.param("simpo-llama3-base", marks=pytest.mark.slow), "tulu3-8b"])
def test_sweep_offline_refuses_in_one_line_where_the_data_is_needed(name, cache_dir, tmp_path):
    result = run_cli_forked("sweep", f"+experiment={name}", f"paths.results={tmp_path}", cache=cache_dir)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("align-harness: error: data file ") and "does not exist" in lines[-1], result.stderr
    assert not (tmp_path / name).exists()  # nothing written


def test_plan_stands_in_only_for_a_data_set_absent_here(tmp_path):
    from types import SimpleNamespace

    from harness.inputs.data import DataUnavailable, load_preference_rows
    from harness.run.pricing import TOKENS_PER_TURN, estimated_lengths, longest_pairs

    data = {"name": "x", "format": "pairs", "hub_id": "a/b", "mirror_file": "x.jsonl", "heldout_pairs": 2,
            "split_seed": 0}
    with pytest.raises(DataUnavailable):
        load_preference_rows(OmegaConf.create(data), tmp_path)
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "chosen": "", "rejected": "r"}\n')
    with pytest.raises(HarnessError) as error:  # a bad row is refused, not priced as if absent
        load_preference_rows(OmegaConf.create(data), tmp_path)
    assert not isinstance(error.value, DataUnavailable)

    budget = {"pairs": 8, "max_prompt_tokens": 16, "max_completion_tokens": 32}
    cfg = OmegaConf.create({"data": data, "budget": budget, "stage_budget": {**budget, "pairs": 4}})
    rows, provenance = longest_pairs(cfg)
    assert len(rows) == provenance["rows"] == 8 + 2 + 1
    lengths = estimated_lengths(rows, SimpleNamespace(max_prompt_tokens=16, max_completion_tokens=32))
    assert set(lengths) == {(16 + TOKENS_PER_TURN, 33, 33)}  # every pair at the budget's longest
