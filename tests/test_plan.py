"""``align-harness plan`` (harness.run.pricing): every unit of a sweep with its cache status, FLOPs and device-hours,
offline, without training or loading a model; bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_forked
from harness.records import read_records
from harness.train.budget import training_flops

TINY = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
        "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4", "name=t"]


def plan(cache: Path, *overrides: str) -> dict:
    result = run_cli_forked("plan", "--json", *overrides, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def units(report: dict, kind: str | None = None) -> list[dict]:
    return [u for u in report["units"] if kind is None or u["kind"] == kind]


def assert_hours_exact(report: dict) -> None:
    rate = report["hardware"]["sustained_flops"]
    for unit in report["units"]:
        assert unit["hours"] == (unit["train_flops"] + unit["score_flops"]) / rate / 3600
        assert unit["remaining_hours"] == unit["remaining_flops"] / rate / 3600
    totals = report["totals"]
    assert totals["flops"] == sum(u["train_flops"] + u["score_flops"] for u in report["units"])
    assert totals["hours"] == totals["flops"] / rate / 3600


def test_plan_of_the_default_sweep_lists_every_unit_and_writes_nothing(tmp_path, cache_dir):
    # conf/sweep.yaml: setting instruct, start + simpo + cpo, held-out preference and three suite tasks; with the sft
    # setting added, its derived SFT stage (under the stage budget, small) comes first
    default = [("instruct", "start", "start"), ("instruct", "train", "simpo"), ("instruct", "train", "cpo")]
    with_sft = default + [("sft", "stage", "sft from instruct (stage_budget small)"),
                          ("sft", "start", "start"), ("sft", "train", "simpo"), ("sft", "train", "cpo")]
    for overrides, units in (((), default), (("settings=[instruct,sft]",), with_sft)):
        report = plan(cache_dir, f"paths.results={tmp_path}", *overrides)
        assert not (tmp_path / report["sweep"]).exists()  # read-only
        assert [(u["setting"], u["kind"], u["name"]) for u in report["units"]] == units
        for unit in report["units"]:
            if unit["kind"] in ("train", "stage"):
                assert unit["train_flops"] > 0 and unit["checkpoint"] in ("cached", "to train")
            if unit["kind"] in ("start", "train"):
                assert unit["score_flops"] > 0
                assert sorted(unit["tasks_done"] + unit["tasks_to_run"]) == [
                    "heldout_preference", "toxicity", "truthfulqa_mc", "win_rate"]
        assert report["hardware"]["name"] == "a100" and report["hardware"]["sustained_flops"] == 1.248e14
        assert_hours_exact(report)


def test_plan_of_the_mistral_experiment_offline(cache_dir, tmp_path):
    # the study's own command line, for GPUs this machine lacks: device and engine are checked by name only, and the
    # launcher's overrides (how units run, not what they cost) are accepted and ignored
    report = plan(cache_dir, "+experiment=simpo-mistral-instruct", f"paths.results={tmp_path}", "plan.hardware=h100",
                  "device=cuda", "engine=vllm", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                  "hydra.launcher.gpus_per_node=8")
    methods = ["dpo", "ipo", "cpo", "kto", "orpo", "rdpo", "slic", "simpo"]
    # variant labels: the study's method_params and data set differ from the shipped defaults
    assert [u["name"].split("[")[0] for u in report["units"]] == ["start", *methods]
    assert report["parameters"] == {"instruct": {"parameters": 7_240_000_000, "from": "model.parameters"}}
    assert units(report, "start")[0]["checkpoint"].startswith("start: hub")  # not downloaded
    train = {u["name"].split("[")[0]: u["train_flops"] for u in units(report, "train")}
    # the matcher's per-visit prices on the same pairs: 6·N per trained token + 2·N per forward-only token, forward-only
    # ratio DPO / IPO / R-DPO 1, KTO 3, the reference-free CPO / ORPO / SimPO 0
    assert train["dpo"] == train["ipo"] == train["rdpo"] > 0
    assert train["kto"] == pytest.approx(train["dpo"] * 12 / 8, rel=1e-12)
    assert train["cpo"] == train["orpo"] == train["simpo"] == pytest.approx(train["dpo"] * 6 / 8, rel=1e-12)
    assert all(u["tasks_to_run"] == ["win_rate"] for u in units(report, "train"))
    # the judge's cost (SmolLM2-135M) on trained rows only: the start row is the reference and is not judged
    assert units(report, "train")[0]["score_flops"] > units(report, "start")[0]["score_flops"] > 0
    assert report["hardware"]["sustained_flops"] == 3.9576e14
    assert_hours_exact(report)


def test_plan_matches_what_a_tiny_sweep_consumes_and_reports_it_cached_and_done(tmp_path, own_cache):
    arguments = [*TINY, f"paths.results={tmp_path}", "settings=[instruct]", "methods=[dpo,kto]"]
    before = plan(own_cache, *arguments, "plan.hardware=cpu-2core")
    assert [(u["name"], u["checkpoint"], u["tasks_done"]) for u in units(before, "train")] == [
        ("dpo", "to train", []), ("kto", "to train", [])]
    assert before["totals"]["remaining_flops"] == before["totals"]["flops"] > 0

    result = run_cli("sweep", *arguments, cache=own_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    after = plan(own_cache, *arguments, "plan.hardware=cpu-2core")
    consumed = {r["method"]: r["consumed"] for r in read_records(tmp_path / "t") if r["method"] != "start"}
    for unit in units(after, "train"):
        assert unit["checkpoint"] == "cached" and unit["tasks_done"] == ["truthfulqa_mc"] and unit["tasks_to_run"] == []
        # the plan's estimate is the FLOPs the run recorded (harness.train.budget.training_flops of its counted tokens)
        spent = consumed[unit["name"]]
        assert spent["flops"] == training_flops(spent["parameters"], spent["policy_tokens"], spent["reference_tokens"])
        assert unit["train_flops"] == pytest.approx(spent["flops"], rel=1e-9)
        assert unit["run_id"] in {r["run_id"] for r in read_records(tmp_path / "t")}
    assert units(after, "start")[0]["tasks_done"] == ["truthfulqa_mc"]
    assert after["totals"]["remaining_flops"] == 0 and after["totals"]["flops"] == before["totals"]["flops"]
    assert after["parameters"]["instruct"]["parameters"] == consumed["dpo"]["parameters"]
    assert_hours_exact(after)


def test_table_output_and_a_sustained_rate_override(tmp_path, cache_dir):
    result = run_cli_forked("plan", *TINY, f"paths.results={tmp_path}", "settings=[pretrained]", "methods=[dpo]",
                            "plan.sustained_flops=1e9", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "hardware a100: 1e+09 FLOP/s sustained" in text
    assert "train FLOPs" in text and "score FLOPs" in text and "hours" in text
    assert any(line.startswith("pretrained  dpo") for line in text.splitlines())
    assert any(line.startswith("total") for line in text.splitlines())
    report = plan(cache_dir, *TINY, f"paths.results={tmp_path}", "settings=[pretrained]", "methods=[dpo]",
                  "plan.sustained_flops=1e9")
    assert report["hardware"]["sustained_flops"] == 1e9
    assert_hours_exact(report)


@pytest.mark.parametrize("overrides, message", [
    (["plan.hardware=tpu"], "plan.hardware=tpu: unknown hardware; available: a100, cpu-2core, h100"),
    (["plan.sustained_flops=-1"], "plan.sustained_flops=-1 must be a positive number of FLOP/s"),
    (["plan.sustained_flops=fast"], "plan.sustained_flops='fast' must be a positive number of FLOP/s"),
    (["plan.format=xml"], "plan.format='xml' is not offered; available: table, json"),
    (["+experiment=simpo-mistral-instruct", "model.parameters=null"], "model.parameters is missing: checkpoint "
                                                                        "mistralai/Mistral-7B-Instruct-v0.2"),
    (["+experiment=simpo-mistral-instruct", "model.parameters=seven"], "model.parameters='seven' must be a positive"),
    (["-m", "methods=[dpo],[kto]"], "plan prices one sweep; drop -m"),
])
def test_bad_plan_input_is_one_line(tmp_path, cache_dir, overrides, message):
    base = [] if any(o.startswith("+experiment=") for o in overrides) else TINY  # the experiment names its own model
    result = run_cli_forked("plan", *base, f"paths.results={tmp_path}", *overrides, cache=cache_dir)
    assert result.returncode == 2
    assert result.stderr.startswith("align-harness: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert result.stdout == "" and not any(tmp_path.iterdir())


def test_a_bad_hardware_file_is_named(tmp_path, cache_dir):
    plugin = tmp_path / "plugin"
    (plugin / "conf" / "hardware").mkdir(parents=True)
    (plugin / "conf" / "hardware" / "slow.yaml").write_text("name: slow\nsustained_flops: 0\n")
    result = run_cli_forked("plan", *TINY, f"paths.results={tmp_path / 'results'}", f"plugins=[{plugin}]",
                            "plan.hardware=slow", cache=cache_dir)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "conf/hardware/slow.yaml: sustained_flops=0 must be a positive number of FLOP/s" in result.stderr


def test_plan_prices_reward_models_derived_stages_and_tuning_trials(tmp_path, cache_dir):
    base = [*TINY, f"paths.results={tmp_path}", "model.checkpoints.sft=derived:sft:instruct"]
    report = plan(cache_dir, *base, "settings=[instruct,sft]", "methods=[dpo,rloo]")
    assert [(u["setting"], u["kind"]) for u in report["units"]] == [
        ("instruct", "start"), ("instruct", "reward"), ("instruct", "train"), ("instruct", "train"),
        ("sft", "stage"), ("sft", "start"), ("sft", "reward"), ("sft", "train"), ("sft", "train")]
    assert all(u["train_flops"] > 0 for u in report["units"] if u["kind"] in ("reward", "stage", "train"))
    assert units(report, "stage")[0]["run_id"]  # the derived setting's key in <cache>/checkpoints/

    tuned = plan(cache_dir, *base, "settings=[instruct]", "methods=[dpo]", "tune.trials=2")
    trials, chosen = units(tuned, "trial"), units(tuned, "train")
    assert [u["name"].split(" {")[0] for u in trials] == ["dpo trial 1/2", "dpo trial 2/2"]
    assert len({u["run_id"] for u in trials}) == 2
    dpo = units(report, "train")[0]
    assert all(u["train_flops"] == dpo["train_flops"] for u in trials)  # same budget, same pairs, other β / rate
    assert chosen[0]["checkpoint"] == "chosen by tuning" and chosen[0]["train_flops"] == 0 < chosen[0]["score_flops"]

    labelled = plan(cache_dir, *base, "settings=[instruct]", "methods=[dpo]", "feedback=local-judge")
    assert [u["kind"] for u in labelled["units"]] == ["feedback", "start", "train"]
    assert labelled["units"][0]["name"] == "local-judge: label 4 pairs" and labelled["units"][0]["train_flops"] > 0
    assert labelled["units"][2]["name"] == "dpo[feedback=local-judge]"  # the variant the sweep would record


def test_every_shipped_family_states_its_size_and_tiny_random_matches_its_weights(tiny_model):
    from harness.run.pricing import configured_parameters
    from harness.run.registry import available, group_config
    from harness.train.rewards import parameter_count

    sizes = {family: configured_parameters(group_config("model", family).get("parameters"), f"{family}.parameters")
             for family in available("model")}
    assert sizes["mistral-7b"] == 7_240_000_000 and sizes["smollm2-135m"] == 135_000_000
    assert sizes["tiny-random"] == parameter_count(tiny_model)  # every tiny-random draw has the same shape
