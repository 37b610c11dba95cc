"""reward.pairs: a Bradley-Terry reward model trains on fewer pairs than the stage budget's (the mini-study: 64)."""

import pytest

from harness.errors import HarnessError
from harness.train.rewards import reward_budget, run_identity
from test_run_spec import START_POINT, tiny_sweep


def test_reward_pairs_replace_the_stage_budgets_and_enter_ppos_run_id():
    plain = tiny_sweep("methods=[ppo]")
    fewer = tiny_sweep("methods=[ppo]", "reward.pairs=3")
    assert plain.reward_budget == plain.stage_budget  # null: the stage budget as it is
    assert fewer.reward_budget.pairs == 3 and fewer.reward_budget.epochs == fewer.stage_budget.epochs
    ids = {s.run_spec("instruct", "ppo", START_POINT).run_id for s in (plain, fewer)}
    assert len(ids) == 2  # the reward model differs, so does the PPO run
    dpo = {s.run_spec("instruct", "dpo", START_POINT).run_id for s in (tiny_sweep(), tiny_sweep("reward.pairs=3"))}
    assert len(dpo) == 1  # a method without a reward: untouched


def test_unset_pairs_keep_the_run_identity_from_before():
    stage = tiny_sweep().stage_budget
    cfg = {"kind": "bradley-terry", "learning_rate": 3e-6}
    assert run_identity({**cfg, "pairs": None}, stage) == run_identity(cfg, stage)


@pytest.mark.parametrize("pairs", [0, -1, 2.5, "many", True])
def test_bad_pairs_are_refused_in_one_line(pairs):
    with pytest.raises(HarnessError, match=r"reward.pairs=.*whole number of training pairs"):
        reward_budget({"kind": "bradley-terry", "pairs": pairs}, tiny_sweep().stage_budget)
