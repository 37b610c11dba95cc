"""Config composition, data normalization and views, budgets: fast, no model needed."""

from __future__ import annotations

import gzip
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import DATA_MIRROR
from harness.train.budget import Budget, training_flops
from harness.inputs.data import load_preference_rows, split_rows, view_rows
from harness.errors import HarnessError
from harness.run.registry import CONF_DIR, available, instantiate


def compose_sweep(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="sweep", overrides=list(overrides))


def test_default_sweep_composes_to_the_documented_defaults():
    cfg = compose_sweep()
    assert cfg.model.family == "smollm2-135m"
    assert list(cfg.settings) == ["instruct"]
    assert list(cfg.methods) == ["simpo", "cpo"]
    assert list(cfg.tasks) == ["heldout_preference", "truthfulqa_mc", "toxicity", "win_rate"]
    assert cfg.budget.name == "default" and cfg.stage_budget.name == "small" and cfg.include_start is True
    # the default budget is small in twice the updates: same pairs, lengths and rate, batches of 4 pairs
    budgets = (cfg.budget, cfg.stage_budget)
    assert [(b.pairs, b.batch_pairs, b.max_prompt_tokens, b.max_completion_tokens) for b in budgets] == [
        (256, 4, 64, 32), (256, 8, 64, 32)]
    assert dict(cfg.stage_budget.learning_rates) == {"all": 1.0e-4}
    assert dict(cfg.budget.learning_rates) == {"all": 1.0e-4}
    assert cfg.model.checkpoints.instruct == "embedded:smollm2-135m-instruct"
    assert cfg.model.checkpoints.sft == "derived:sft:instruct"
    assert cfg.name == "smollm2-135m-default"


def test_sweep_cache_reaches_every_model_resolver(tmp_path, monkeypatch):
    """paths.cache is handed to judges explicitly (TaskContext / TrainingJob .cache_root): no environment channel."""
    import os

    from harness.evaluate.judges import build_judge
    from harness.run.sweep import Sweep

    monkeypatch.setenv("ALIGN_HARNESS_CACHE", str(tmp_path / "env-cache"))
    before = dict(os.environ)
    Sweep(compose_sweep("model=tiny-random", f"paths.cache={tmp_path / 'sweep-cache'}", f"paths.results={tmp_path}"))
    assert dict(os.environ) == before  # the sweep leaves the environment alone
    judge = build_judge({"type": "local_hf", "model": "tiny-random:2"}, cache_dir=tmp_path / "sweep-cache")
    judge.load()
    assert (tmp_path / "sweep-cache" / "models").is_dir() and not (tmp_path / "env-cache").exists()


def test_overrides_reach_every_group():
    cfg = compose_sweep("model=tiny-random", "budget=micro", "methods=[kto]", "budget.pairs=2",
                        "+method_params.kto.beta=0.3", "budget@stage_budget=standard")
    assert cfg.model.family == "tiny-random" and cfg.name == "tiny-random-micro"
    assert cfg.budget.pairs == 2 and cfg.stage_budget.name == "standard"
    method = instantiate("method", "kto", cfg.method_params.get("kto"), params_key="method_params")
    assert method.beta == 0.3 and method.data_view == "unpaired"


def test_every_shipped_family_names_all_three_settings():
    for family in available("model"):
        cfg = compose_sweep(f"model={family}")
        assert set(cfg.model.checkpoints) == {"pretrained", "sft", "instruct"}, family
    assert {"smollm2-135m", "tiny-random", "qwen2.5-0.5b", "mistral-7b"} <= set(available("model"))


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(HarnessError, match=r"unknown method 'nope'; available: .*dpo.*kto"):
        instantiate("method", "nope", None, params_key="method_params")


def test_unknown_method_parameter_names_the_key():
    with pytest.raises(HarnessError, match=r"method_params\.dpo"):
        instantiate("method", "dpo", OmegaConf.create({"betaa": 1}), params_key="method_params")


def test_hh_mirror_normalizes_and_splits_to_documented_sizes():
    cfg = compose_sweep()
    rows, provenance = load_preference_rows(cfg.data, DATA_MIRROR)
    assert provenance["rows"] == 2307 and provenance["dropped_mismatched_prompts"] == 5
    first = rows[0]
    assert first["prompt"][0]["role"] == "user" and first["prompt"][-1]["role"] == "user"
    assert first["chosen"] and first["rejected"] and first["source_row"] == 1
    train, heldout = split_rows(rows, heldout=cfg.data.heldout_pairs, seed=cfg.data.split_seed)
    assert (len(train), len(heldout)) == (2051, 256)
    again, _ = split_rows(rows, heldout=256, seed=0)
    assert [r["source_row"] for r in again[:20]] == [r["source_row"] for r in train[:20]]
    assert not {r["source_row"] for r in train} & {r["source_row"] for r in heldout}


def test_views_derive_unpaired_and_sft_rows():
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "good", "rejected": "bad", "source_row": 1}
    unpaired = view_rows([pair], "unpaired")
    assert [(r["completion"], r["label"]) for r in unpaired] == [("good", True), ("bad", False)]
    assert view_rows([pair], "sft") == [{"prompt": pair["prompt"], "completion": "good"}]
    assert view_rows([pair], "pairs")[0]["rejected"] == "bad"


def _mirror_with(tmp_path, lines: list[str]):
    folder = tmp_path / "hh-rlhf" / "harmless-base"
    folder.mkdir(parents=True)
    with gzip.open(folder / "test.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return tmp_path


GOOD = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"test\.jsonl\.gz:2: not valid JSON"),
    (json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: x"}), r"test\.jsonl\.gz:2: field 'rejected' is missing"),
    (json.dumps({"chosen": "hi there", "rejected": "\n\nHuman: hi\n\nAssistant: x"}), r":2: field 'chosen' does not start"),
    (json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}), r":2: field 'chosen' does not end with an Assistant"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, bad, message):
    mirror = _mirror_with(tmp_path, [GOOD, bad])
    with pytest.raises(HarnessError, match=message):
        load_preference_rows(compose_sweep().data, mirror)


def test_missing_mirror_file_names_the_setting_to_fix(tmp_path):
    with pytest.raises(HarnessError, match=r"does not exist; set data_mirror"):
        load_preference_rows(compose_sweep().data, tmp_path)


def test_budget_validation_and_flops():
    cfg = compose_sweep()
    budget = Budget.from_config(cfg.budget)
    plain = OmegaConf.to_container(cfg.budget)
    assert not hasattr(budget, "planned_steps")  # derived numbers are the training plan's (tests/test_training_plan.py)
    with pytest.raises(HarnessError, match=r"budget\.pairs=5000 but hh-harmless has only 2051"):
        Budget.from_config({**plain, "pairs": 5000}).check_fits(2051, "hh-harmless")
    with pytest.raises(HarnessError, match=r"not a multiple of budget\.micro_batch_pairs"):
        Budget.from_config({**plain, "batch_pairs": 6})
    with pytest.raises(HarnessError, match=r"budget\.typo is not a budget field"):
        Budget.from_config({**plain, "typo": 1})
    assert training_flops(10, 3, 5) == 6 * 10 * 3 + 2 * 10 * 5
