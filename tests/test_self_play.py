"""Self-play methods on iterative DPO's round loop (methods/iterative_dpo.py): SPPO's win-probability estimate and
the cost models by hand; self-rewarding (the policy judges its own samples) through the real CLI on tiny-random.
SPPO runs through the CLI with the other online methods (tests/test_rewards_and_online.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from conftest import run_cli
from harness.records import read_records
from harness.train.rounds import best_and_worst
from harness.train.oracles import bradley_terry_matrix, mean_win_probabilities
from methods.self_rewarding import SelfRewarding
from methods.sppo import SPPO


def test_win_probabilities_by_hand():
    # rewards 0, ln 3, 0: σ(ln 3) = 3/4, σ(−ln 3) = 1/4, σ(0) = 1/2
    matrix = bradley_terry_matrix([0.0, math.log(3), 0.0])
    assert matrix == [[0.5, pytest.approx(0.25), 0.5], [pytest.approx(0.75), 0.5, pytest.approx(0.75)],
                      [0.5, pytest.approx(0.25), 0.5]]
    # P̂(y_i ≻ π) = row mean, the diagonal ½ included: (½ + ¼ + ½)/3 = 5/12, (¾ + ½ + ¾)/3 = 2/3
    wins = mean_win_probabilities(matrix)
    assert wins == [pytest.approx(5 / 12), pytest.approx(2 / 3), pytest.approx(5 / 12)]
    assert best_and_worst(wins) == (1, 0)  # winner y_2; the loser is the first of the two equal ones
    # a judge's matrix need not be transitive: 1 beats 2 (.9), 2 beats 3 (.8), 3 beats 1 (.7)
    cyclic = [[0.5, 0.9, 0.3], [0.1, 0.5, 0.8], [0.7, 0.2, 0.5]]
    assert mean_win_probabilities(cyclic) == [pytest.approx(1.7 / 3), pytest.approx(1.4 / 3), pytest.approx(1.4 / 3)]
    assert best_and_worst([0.5, 0.5]) is None  # all tied: no pair


def test_self_play_cost_models_by_hand():
    budget = SimpleNamespace(batch_pairs=4)
    sizes = SimpleNamespace(reward_share=0.5)
    # prompt 10 + completion 5 = 15 per sequence; one (winner, loser) pair trained: 30 tokens, and referenced: 30
    # SPPO, K = 5, reward oracle: 75 generated + 75·½ rewarded + 30 referenced = 142.5 forward-only
    assert SPPO(samples=5).visit_cost(10, 5, budget, sizes) == (30.0, 142.5)
    # a judge oracle: 5·4 ordered comparisons × (95 prompt-template tokens + 10 + 2·5) = 2300, policy-sized
    judged = SPPO(samples=5, judge={"type": "local_hf", "model": "tiny-random:3"})
    assert judged.visit_cost(10, 5, budget, sizes) == (30.0, 75 + 2300 + 30)
    assert not judged.needs_reward and SPPO().needs_reward
    # held-out greedy completions of the reward oracle's stopping rule: (3 rounds + 1) × 8 available × 15 × 1.5
    assert SPPO(rounds=3).run_cost(10, 5, budget, sizes, heldout_prompts=8) == (0.0, 720.0)
    assert judged.run_cost(10, 5, budget, sizes, heldout_prompts=8) == (0.0, 0.0)
    # self-rewarding, N = 4: 60 generated + 4·3·115 = 1380 judged by the policy itself + 30 referenced
    assert SelfRewarding(samples=4).visit_cost(10, 5, budget, sizes) == (30.0, 60 + 1380 + 30)
    assert SelfRewarding(rounds=3).visit_granularity(budget) == (12, 3)


SELF_REWARDING_SWEEP = [
    "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "include_start=false", "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4",
    "methods=[self_rewarding]", "budget.pairs=16", "budget.max_completion_tokens=4",
    "+method_params.self_rewarding.rounds=2", "+method_params.self_rewarding.samples=3",
    "+method_params.self_rewarding.learning_rate=1e-3",
]


def test_self_rewarding_runs_through_the_cli_judging_its_own_samples(tmp_path, cache_dir):
    result = run_cli("sweep", *SELF_REWARDING_SWEEP, f"paths.results={tmp_path}", "name=s", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "s")
    assert record["status"] == "ok", record["reason"]
    assert "reward" not in record["run_config"] and record["feedback"] == "human"  # no reward, no labels used
    consumed = record["consumed"]
    # no external yardstick: both rounds run, the last is kept
    assert consumed["rounds_done"] == 2 and consumed["chosen_round"] == 2 and not consumed["stopped_early"]
    assert consumed["heldout_rewards"] == [None, None, None]
    # 16 prompts in 2 rounds of 8; 3 samples a prompt → 3 comparisons, each in both orders
    assert [p + t for p, t in zip(consumed["round_pairs"], consumed["round_ties_dropped"])] == [8, 8]
    assert 0 < consumed["judgments"] <= 2 * 8 * 3 and consumed["judge_tokens"] > consumed["judgments"] * 2 * 95
    assert consumed["pairs"] == sum(consumed["round_pairs"])  # one DPO pass over each round's pairs
    assert all(gap > 0 for gap in consumed["judge_score_gaps"])  # chosen = the sample the policy judged best
    assert consumed["judge"]["model"] == "the policy of each round"
    assert consumed["reference_tokens"] >= consumed["generation_tokens"] + consumed["judge_tokens"]
    # each round's DPO starts where its reference is (the previous round's policy): loss −log σ(0) = ln 2 at step 1
    lines = (tmp_path / "s" / "curves" / f"{record['run_id']}.jsonl").read_text().splitlines()
    first_losses = {}
    for entry in map(json.loads, lines):
        if "loss" in entry and entry["round"] not in first_losses:
            first_losses[entry["round"]] = entry["loss"]
    assert first_losses == {1: pytest.approx(math.log(2), abs=1e-4), 2: pytest.approx(math.log(2), abs=1e-4)}
