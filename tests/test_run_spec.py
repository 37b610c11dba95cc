"""Run specs and score keys (harness.run.spec): every hyperparameter is in the run id, the variant name says what
differs from the defaults, and a score key changes with everything that can move a number — and nothing else."""

from __future__ import annotations

import copy

import pytest

from conftest import run_cli
from harness.errors import HarnessError
from harness.records import read_records
from harness.run import registry
from harness.run.spec import START, RunSpec, ScoreKey, differences, variant_name
from harness.run.sweep import StartPoint, Sweep
from test_config_and_data import compose_sweep

START_POINT = StartPoint("instruct", {"spec": "tiny-random:0"})


def tiny_sweep(*overrides: str, methods: str = "[dpo,kto]", tasks: str = "[heldout_preference,truthfulqa_mc]") -> Sweep:
    sweep = Sweep(compose_sweep("model=tiny-random", "budget=micro", f"methods={methods}",
                                f"tasks={tasks}", *overrides))
    sweep.validate()
    return sweep


def changed(value):
    """A different value of the same kind, for any default a constructor declares."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, dict):
        return {**value, "changed": 1}
    if isinstance(value, list):
        return [*value, "changed"]
    return {"type": "local_hf", "model": "tiny-random:3"} if value is None else None


def test_every_hyperparameter_of_every_method_is_in_the_run_id():
    sweep = tiny_sweep()
    checked = 0
    for name in registry.available("method"):
        method, arguments = registry.build("method", name, None, params_key="method_params")
        base = sweep.run_spec("instruct", name, START_POINT, method, arguments)
        assert base.variant == name and base.hyperparameters == {k: v for k, v in arguments.items() if k != "name"}
        for key, value in arguments.items():
            if key == "name":
                continue
            other = sweep.run_spec("instruct", name, START_POINT, method, {**arguments, key: changed(value)})
            assert other.run_id != base.run_id, (name, key)
            assert other.variant.startswith(f"{name}[") and key in other.variant, (name, key, other.variant)
            checked += 1
    assert checked > 100  # 29 methods, ~4 knobs each


def test_every_hyperparameter_has_a_one_line_help():
    for group in ("method", "task"):
        for name in registry.available(group):
            _, arguments = registry.bound_arguments(group, name, None, params_key=f"{group}_params")
            helps = registry.parameter_help(group, name)
            assert not [k for k in arguments if k != "name" and not helps.get(k)], (group, name)


def test_an_unknown_hyperparameter_is_refused_in_one_line():
    with pytest.raises(HarnessError, match=r"method_params\.dpo\.bet is not a parameter of method 'dpo'; it takes: "
                                           r"beta, learning_rate"):
        registry.build("method", "dpo", {"bet": 0.1}, params_key="method_params")


def test_variant_names_say_what_differs_from_the_defaults():
    assert variant_name("dpo", {}) == "dpo"
    assert variant_name("dpo", {"pairs": 64, "beta": 0.05}) == "dpo[beta=0.05,pairs=64]"
    assert differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}}) == {"b.d": 3}
    sweep = tiny_sweep("+method_params.dpo.beta=0.05", "budget.pairs=24")
    dpo = sweep.run_spec("instruct", "dpo", START_POINT)
    kto = sweep.run_spec("instruct", "kto", START_POINT)
    assert (dpo.variant, kto.variant) == ("dpo[beta=0.05,pairs=24]", "kto[pairs=24]")
    assert tiny_sweep().run_spec("instruct", "dpo", START_POINT).variant == "dpo"  # toy budget and data as shipped
    start = sweep.run_spec("instruct", START, START_POINT)
    assert start.variant == "start" and start.identity == {"family": "tiny-random", "setting": "instruct",
                                                           "start": {"spec": "tiny-random:0"}, "method": "start"}


def test_run_spec_is_frozen_and_canonical():
    spec = tiny_sweep().run_spec("instruct", "dpo", START_POINT)
    with pytest.raises(Exception):
        spec.method = "kto"
    assert isinstance(spec, RunSpec) and spec.run_id == tiny_sweep().run_spec("instruct", "dpo", START_POINT).run_id
    assert '"method":"dpo"' in spec.canonical()


def test_score_key_changes_with_what_moves_a_number_and_nothing_else():
    base = tiny_sweep()
    keys = {task: base.score_key(task, "run-a") for task in ("heldout_preference", "truthfulqa_mc")}

    def key_after(task: str, *overrides: str, run_id: str = "run-a") -> ScoreKey:
        return tiny_sweep(*overrides).score_key(task, run_id)

    # each of these rescores
    for task, overrides in [
        ("heldout_preference", ["+task_params.heldout_preference.limit=8"]),          # subset
        ("heldout_preference", ["+task_params.heldout_preference.version=2"]),        # task version
        ("heldout_preference", ["eval_batch_size=3"]),                                # batch
        ("heldout_preference", ["budget.max_completion_tokens=9"]),                   # truncation of held-out pairs
        ("heldout_preference", ["data.heldout_pairs=40"]),                            # the held-out split
        ("truthfulqa_mc", ["+task_params.truthfulqa_mc.limit=3"]),
        ("truthfulqa_mc", ["eval_batch_size=3"]),
        ("truthfulqa_mc", ["engine=hf"]),                                              # the engine (vllm: below)
        ("heldout_preference", ["engine=hf"]),
        ("truthfulqa_mc", ["eval_precision=bf16"]),                                    # scoring precision
        ("heldout_preference", ["eval_precision=bf16"]),
    ]:
        assert key_after(task, *overrides).value != keys[task].value, (task, overrides)
        assert key_after(task, *overrides).measurement_key != keys[task].measurement_key, (task, overrides)
    assert "precision" not in keys["truthfulqa_mc"].evaluation  # fp32 (the default) keeps the key records always had
    assert key_after("truthfulqa_mc", run_id="run-b").value != keys["truthfulqa_mc"].value          # the checkpoint
    assert key_after("truthfulqa_mc", run_id="run-b").measurement_key == keys["truthfulqa_mc"].measurement_key
    # ... and these do not
    for task, overrides in [
        ("truthfulqa_mc", ["budget.max_completion_tokens=9"]),   # truthfulqa reads no held-out pairs
        ("truthfulqa_mc", ["data.heldout_pairs=40"]),
        ("truthfulqa_mc", ["+method_params.dpo.beta=0.3"]),
        ("heldout_preference", ["+task_params.heldout_preference.primary_metrics=[logratio_accuracy]"]),  # display
        ("heldout_preference", ["budget.pairs=24"]),
    ]:
        assert key_after(task, *overrides).value == keys[task].value, (task, overrides)


def test_the_judge_is_in_the_score_key():
    base = tiny_sweep(tasks="[win_rate]").score_key("win_rate", "run-a")
    other = tiny_sweep("+task_params.win_rate.judge.max_output_chars=500", tasks="[win_rate]").score_key("win_rate", "run-a")
    model = tiny_sweep("+task_params.win_rate.judge.model=tiny-random:4", tasks="[win_rate]").score_key("win_rate", "run-a")
    assert len({base.value, other.value, model.value}) == 3


def test_records_carry_spec_variant_and_score_key_and_a_changed_subset_rescores(tmp_path, cache_dir):
    common = ["sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro", "settings=[instruct]",
              "tasks=[heldout_preference]", f"paths.results={tmp_path}", "name=t"]
    first = run_cli(*common, "methods=[dpo]", "+task_params.heldout_preference.limit=4", cache=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(*common, "methods=[dpo]", "+task_params.heldout_preference.limit=4", cache=cache_dir)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("done before, skipped") == 2, again.stdout[-2000:]
    rescored = run_cli(*common, "methods=[dpo]", "+task_params.heldout_preference.limit=2", cache=cache_dir)
    log = rescored.stdout + rescored.stderr
    assert rescored.returncode == 0 and "done before" not in log, log[-2000:]
    assert "checkpoint" in log and "cached" in log  # the same run: not retrained
    records = read_records(tmp_path / "t")
    assert len(records) == 4 and {r["variant"] for r in records} == {"start", "dpo"}
    by_limit = {(r["variant"], r["measurement"]["config"]["limit"]): r for r in records}
    assert set(by_limit) == {(v, n) for v in ("start", "dpo") for n in (4, 2)}
    for record in records:
        assert record["task_key"] == f"heldout_preference-{record['score_key']}"
        assert record["run_config"]["method"] == record["method"]
    assert by_limit[("dpo", 4)]["measurement_key"] == by_limit[("start", 4)]["measurement_key"]
    assert by_limit[("dpo", 4)]["measurement_key"] != by_limit[("dpo", 2)]["measurement_key"]
    # the README's example: a changed beta and budget are a new variant beside the old one, not a replacement
    example = run_cli(*common, "methods=[dpo,kto]", "+method_params.dpo.beta=0.05", "budget.pairs=8",
                      "+task_params.heldout_preference.limit=2", cache=cache_dir)
    assert example.returncode == 0, example.stderr[-3000:]
    variants = {r["variant"] for r in read_records(tmp_path / "t")}
    assert variants == {"start", "dpo", "dpo[beta=0.05,pairs=8]", "kto[pairs=8]"}
    table = (tmp_path / "t" / "leaderboard.md").read_text()
    for variant in variants:  # one row each in the setting's table
        assert f"| {variant} |" in table, variant


def test_records_from_before_keep_their_run_ids():
    """Run ids hash the same run config as before this change (checkpoints cached by run id are reused), except for
    the two methods whose hand-written list differed from their signature (cdpo, dpop)."""
    sweep = tiny_sweep()
    spec = sweep.run_spec("instruct", "dpo", START_POINT)
    legacy = copy.deepcopy(spec.identity)
    assert set(legacy) == {"family", "setting", "start", "method", "method_class", "hyperparameters", "budget", "data",
                           "seed"}
    assert legacy["hyperparameters"] == {"beta": 0.1, "learning_rate": 5e-7, "loss_type": "sigmoid",
                                         "label_smoothing": 0.0}


def test_describe_lists_every_parameter_with_its_help(cache_dir):
    result = run_cli("describe", "method", "dpo", cache=cache_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("method dpo: methods.dpo.DPO")
    assert [line.split()[0] for line in lines[1:]] == ["beta", "learning_rate", "loss_type", "label_smoothing"]
    assert "KL-penalty strength" in lines[1]
    bad = run_cli("describe", "method", "nope", cache=cache_dir)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown method 'nope'" in bad.stderr


def test_ai_feedback_and_reward_choices_name_their_variant():
    ai = tiny_sweep("feedback=local-judge", "feedback.judge.model=tiny-random:3")
    assert ai.run_spec("instruct", "dpo", START_POINT).variant == "dpo[feedback=local-judge]"
    online = tiny_sweep("reward=short-answers", methods="[rloo]")
    assert online.run_spec("instruct", "rloo", START_POINT).variant == "rloo[reward=short-answers]"
    assert tiny_sweep(methods="[rloo]").run_spec("instruct", "rloo", START_POINT).variant == "rloo"


def test_a_budgets_learning_rates_set_each_methods_rate_under_method_params():
    """budget.learning_rates: a method's own entry, else ``all``, replaces its YAML rate; the variant name leaves the
    budget's rate out (the budget is in the run id), method_params still win and name themselves; bad values are one
    line."""
    sweep = tiny_sweep("+budget.learning_rates={all: 1.0e-4, kto: 3.0e-5}")
    dpo = sweep.run_spec("instruct", "dpo", START_POINT)
    kto = sweep.run_spec("instruct", "kto", START_POINT)
    assert dpo.hyperparameters["learning_rate"] == 1e-4 and kto.hyperparameters["learning_rate"] == 3e-5
    assert (dpo.variant, kto.variant) == ("dpo[learning_rate=0.0001]", "kto[learning_rate=3e-05]")  # not micro's
    assert dpo.budget["learning_rates"] == {"all": 1e-4, "kto": 3e-5}
    plain = tiny_sweep().run_spec("instruct", "dpo", START_POINT)
    assert "learning_rates" not in plain.budget and plain.run_id != dpo.run_id  # shipped budgets keep their run ids
    own = tiny_sweep("+budget.learning_rates={all: 1.0e-4}", "+method_params.dpo.learning_rate=2.0e-4")
    spec = own.run_spec("instruct", "dpo", START_POINT)
    assert spec.hyperparameters["learning_rate"] == 2e-4 and "learning_rate=0.0002" in spec.variant
    with pytest.raises(HarnessError, match=r"budget.learning_rates.dpo"):
        tiny_sweep("+budget.learning_rates={dpo: -1.0}")
