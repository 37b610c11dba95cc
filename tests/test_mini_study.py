"""+experiment=mini-study: both embedded families (a Hydra multirun over model), every offline setting, the eight
methods under budget.match=flops with three seeds; checkpoints dropped once scored."""

from __future__ import annotations

from omegaconf import OmegaConf

from harness.run.registry import group_config
from test_config_and_data import compose_sweep


def test_the_mini_study_sweeps_both_families_over_every_setting_with_three_seeds():
    study = OmegaConf.to_container(group_config("experiment", "mini-study"))
    assert study["hydra"]["mode"] == "MULTIRUN"
    assert {"override /hydra/launcher": "workers"} in study["defaults"]
    assert study["hydra"]["sweeper"]["params"]["model"].split(",") == ["smollm2-135m", "gemma3-270m"]
    for family in ("smollm2-135m", "gemma3-270m"):
        cfg = compose_sweep("+experiment=mini-study", f"model={family}")
        assert cfg.model.family == family and list(cfg.settings) == ["pretrained", "sft", "instruct"]
        assert {"sft", "dpo", "ipo", "kto", "cpo", "orpo", "simpo", "ppo"} <= set(cfg.methods)
        assert list(cfg.seeds) == [0, 1, 2] and cfg.budget.match == "flops" and cfg.keep_checkpoints is False
        assert cfg.budget.learning_rates["all"] == 1e-4 and cfg.stage_budget.name == "small"
        assert cfg.eval_precision == "bf16" and cfg.task_params.heldout_preference.limit == 128
        assert cfg.eval_batch_size == 32
        assert cfg.fanout is True  # two local workers of one thread each (README: CPU mini-study)
    offline = {"smollm2-135m": {"sft", "instruct"}, "gemma3-270m": {"pretrained", "sft"}}
    for family, settings in offline.items():  # every setting runs offline in one family or the other
        checkpoints = OmegaConf.to_container(compose_sweep(f"model={family}").model.checkpoints)
        local = {s for s, spec in checkpoints.items() if spec.startswith(("embedded:", "derived:"))}
        assert local == settings
    assert set().union(*offline.values()) == {"pretrained", "sft", "instruct"}
