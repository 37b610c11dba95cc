"""Rewards (harness/train/rewards.py) and the online / RL methods (ppo, rloo, grpo, online_dpo, iterative_dpo, sppo, rso) on
tiny-random: a Bradley-Terry reward model trains, is cached and records its held-out accuracy; every online
method runs through the real CLI to ok records; under the ``short-answers`` reward the mean reward of PPO
and RLOO rises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from harness.records import read_records
from harness.run.registry import CONF_DIR

ONLINE = ["ppo", "rloo", "grpo", "online_dpo", "iterative_dpo", "sppo", "rso"]


def test_short_answers_reward_by_hand():
    from harness.train.rewards import ShortAnswers, pairwise_accuracy

    reward = ShortAnswers(max_chars=10)
    # 1 − min(len/10, 1): "" → 1, "abcd" → .6, 12 characters → 0
    assert reward.score([[], [], []], ["", "abcd", "x" * 12]) == [1.0, 0.6, 0.0]
    assert reward.parameters == 0 and reward.identity == {"kind": "short-answers", "max_chars": 10}
    # chosen > rejected, a tie (half), chosen < rejected → (1 + .5 + 0)/3
    assert pairwise_accuracy([2.0, 1.0, 0.0], [1.0, 1.0, 1.0])[0] == pytest.approx(0.5)


def test_trl_reward_function_counts_what_was_generated(tiny_model):
    from transformers import AutoTokenizer

    from harness.train.rewards import ShortAnswers, trl_reward_function

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    function = trl_reward_function(ShortAnswers(max_chars=10), tokenizer)
    prompt = [{"role": "user", "content": "hi"}]
    eos = tokenizer.eos_token_id
    scores = function(prompts=[prompt, prompt], completions=[[{"role": "assistant", "content": "abcd"}],
                                                             [{"role": "assistant", "content": ""}]],
                      completion_ids=[[5, 6, eos, eos], [eos]])
    assert scores == [0.6, 1.0] and function.__name__ == "reward_short_answers"
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # completions end at their first EOS (3 and 1 tokens); each prompt counted once per completion
    assert function.usage == {"calls": 1, "completions": 2, "prompt_tokens": 2 * prompt_tokens, "completion_tokens": 4}


def test_bradley_terry_reward_trains_is_cached_and_records_heldout_accuracy(tmp_path, cache_dir, tiny_model):
    from harness.train.budget import Budget
    from harness.inputs.data import split_rows, toy_preference_rows
    from harness.protocols import RewardContext
    from harness.train.rewards import MODEL_INFO, build_reward

    rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}], "source_row": n}
            for n, row in toy_preference_rows(48)]
    train, heldout = split_rows(rows, heldout=8, seed=0)
    budget = Budget.from_config(OmegaConf.load(CONF_DIR / "budget" / "toy.yaml"))
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "reward" / "bradley-terry.yaml"), {"learning_rate": 1e-3})
    context = RewardContext(start_checkpoint=tiny_model, train_pairs=train, heldout_pairs=heldout, budget=budget,
                            cache_dir=tmp_path / "rewards", device="cpu", results_dir=tmp_path)
    reward = build_reward(cfg, context)
    assert reward.kind == "bradley-terry" and reward.cache_hit is False
    info = json.loads((reward.path / MODEL_INFO).read_text())
    assert info["heldout_pairs"] == 8 and info["heldout_accuracy"] == reward.heldout_accuracy
    assert info["consumed"]["optimizer_steps"] == 8 and info["consumed"]["flops"] > 0  # budget=toy: 32 pairs, 4 a step
    assert info["consumed"]["pairs"] == 32
    # the toy preference ("Certainly, happy to help." over "No.") is learnable: held-out accuracy well above chance
    assert reward.heldout_accuracy > 0.75, info
    assert reward.parameters > 0 and reward.path.parent == tmp_path / "rewards"
    prompt = heldout[0]["prompt"]
    chosen, rejected = reward.score([prompt, prompt], [heldout[0]["chosen"], heldout[0]["rejected"]])
    assert chosen > rejected and reward.tokens_scored > 0

    again = build_reward(cfg, context)  # the same inputs: a cache hit, no training
    assert again.cache_hit is True and again.path == reward.path and again.identity == reward.identity
    assert again.heldout_accuracy == reward.heldout_accuracy
    other = build_reward(OmegaConf.merge(cfg, {"learning_rate": 5e-4}), context)  # different settings: a new model
    assert other.path != reward.path


def curves(folder: Path, record: dict) -> list[dict]:
    lines = (folder / "curves" / f"{record['run_id']}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# Shrunk for a learnable signal in seconds: 4-token completions (each token's length moves the reward a lot),
# low sampling temperature (the random tiny model's near-uniform distribution over 49k tokens gets peaked),
# learning rates for a 3M-parameter random model, max_chars=32 so the reward spread outweighs the KL penalty.
ONLINE_SWEEP = [
    "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "reward=short-answers", "reward.max_chars=32", "include_start=false", "tasks=[heldout_preference]",
    "+task_params.heldout_preference.limit=4", "budget.pairs=32", "budget.batch_pairs=8", "budget.micro_batch_pairs=4",
    "budget.max_completion_tokens=4",
    "+method_params.ppo.learning_rate=3e-3", "+method_params.ppo.temperature=0.1",
    "+method_params.rloo.learning_rate=1e-3", "+method_params.rloo.temperature=0.1",
    "+method_params.rloo.num_iterations=4",
    "+method_params.grpo.learning_rate=1e-3", "+method_params.grpo.temperature=0.1",
    "+method_params.grpo.num_generations=2",
    "+method_params.online_dpo.learning_rate=1e-3",
    "+method_params.iterative_dpo.learning_rate=1e-3", "+method_params.iterative_dpo.rounds=2",
    "+method_params.iterative_dpo.heldout_prompts=8",
    # sppo: both rounds run (min_improvement -1: the stopping rule never fires on rewards in [0, 1]); default beta
    "+method_params.sppo.learning_rate=1e-3", "+method_params.sppo.rounds=2", "+method_params.sppo.samples=3",
    "+method_params.sppo.heldout_prompts=8", "+method_params.sppo.min_improvement=-1",
    "+method_params.rso.learning_rate=1e-3", "+method_params.rso.candidates=8", "+method_params.rso.accepted=4",
]


def test_online_methods_run_through_the_cli_and_the_reward_rises(tmp_path, cache_dir):
    result = run_cli("sweep", *ONLINE_SWEEP, f"methods=[{','.join(ONLINE)}]", f"paths.results={tmp_path}", "name=o",
                     cache=cache_dir, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "o"
    records = {r["method"]: r for r in read_records(folder)}
    assert set(records) == set(ONLINE)
    failed = {m: r["reason"] for m, r in records.items() if r["status"] != "ok"}
    assert not failed, failed
    for method, record in records.items():
        consumed = record["consumed"]
        assert record["run_config"]["reward"] == {"name": "short-answers", "kind": "short-answers", "max_chars": 32}
        assert consumed["reward"]["kind"] == "short-answers" and consumed["reward_tokens"] == 0
        assert consumed["generation_tokens"] > 0 and consumed["optimizer_steps"] > 0, (method, consumed)
        assert consumed["flops"] > 0 and consumed["reference_tokens"] >= consumed["generation_tokens"], (method, consumed)
        assert record["metrics"]["logratio_accuracy"]["value"] is not None
    ppo = records["ppo"]["consumed"]
    # 32 prompts / 8 per rollout = 4 iterations × 4 PPO epochs × 1 minibatch
    assert ppo["optimizer_steps"] == 16 and ppo["examples"] == 32 and ppo["iterations"] == 4
    assert ppo["policy_trained_tokens"] == 4 * ppo["generation_tokens"] and ppo["value_tokens"] == ppo["generation_tokens"]
    assert records["rloo"]["consumed"]["optimizer_steps"] == 16  # 4 generation batches × num_iterations 4
    assert records["grpo"]["consumed"]["optimizer_steps"] == records["online_dpo"]["consumed"]["optimizer_steps"] == 4
    assert records["online_dpo"]["consumed"]["completions"] == 64  # two samples for each of the 32 prompts
    iterative = records["iterative_dpo"]["consumed"]
    assert 1 <= iterative["rounds_done"] <= 2 and len(iterative["heldout_rewards"]) == iterative["rounds_done"] + 1
    assert iterative["stopped_early"] == (iterative["rounds_done"] < 2)  # the stopping rule, or both rounds ran
    sppo = records["sppo"]["consumed"]
    assert sppo["rounds_done"] == 2 and sppo["oracle"] == "reward (Bradley-Terry link)"
    assert sum(sppo["round_pairs"]) + sum(sppo["round_ties_dropped"]) == 32  # 16 prompts a round, 3 samples each
    assert all(w > l for w, l in zip(sppo["winner_win_probabilities"], sppo["loser_win_probabilities"]))
    # TRL's sppo_hard loss, (log-ratio_w − 1/2β)² + (log-ratio_l + 1/2β)², is 2·(1/2β)² = 1/2β² at each round's first
    # step — the round's policy and its reference (the previous round's policy) are the same model there
    beta = records["sppo"]["run_config"]["hyperparameters"]["beta"]
    first_losses = {}
    for entry in curves(folder, records["sppo"]):
        if "loss" in entry and entry["round"] not in first_losses:
            first_losses[entry["round"]] = entry["loss"]
    assert first_losses == {1: pytest.approx(0.5 / beta ** 2, rel=1e-3), 2: pytest.approx(0.5 / beta ** 2, rel=1e-3)}

    rises = {}
    for method in ("ppo", "rloo"):
        rewards = [c["reward"] for c in curves(folder, records[method]) if "reward" in c]
        assert len(rewards) == 4, (method, rewards)
        rises[method] = (rewards[0], rewards[-1])
        assert rewards[-1] > rewards[0] + 0.03, (method, rewards)
        assert max(rewards[2:]) > max(rewards[:2]), (method, rewards)
    print("mean reward first → last:", rises)
    ppo_curve = curves(folder, records["ppo"])[-1]
    assert {"reward", "kl", "entropy", "value_loss", "clip_fraction", "loss", "kl_coef"} <= set(ppo_curve)


def test_ppo_with_the_default_bradley_terry_reward(tmp_path, cache_dir):
    """The sweep's default reward end to end: the reward model trains under the stage budget, PPO's value
    model starts from it, and the record names it with its held-out accuracy and cost."""
    result = run_cli("sweep", "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy",
                     "settings=[instruct]", "include_start=false", "tasks=[heldout_preference]",
                     "+task_params.heldout_preference.limit=4", "methods=[ppo]", "budget.pairs=8",
                     "budget.max_completion_tokens=4", "reward.learning_rate=1e-3", "reward.heldout_pairs=8",
                     "+method_params.ppo.ppo_epochs=1", "+method_params.ppo.learning_rate=1e-3",
                     f"paths.results={tmp_path}", "name=b", cache=cache_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_records(tmp_path / "b")
    assert record["status"] == "ok", record["reason"]
    consumed = record["consumed"]
    assert consumed["reward"]["kind"] == "bradley-terry" and 0 <= consumed["reward"]["heldout_accuracy"] <= 1
    assert consumed["value_init"] == consumed["reward"]["path"]
    assert consumed["reward"]["training"]["optimizer_steps"] == 8  # its own cost: 32 toy pairs / 4 per step
    assert consumed["reward_tokens"] > 0 and consumed["reward_parameters"] > 0
    assert record["run_config"]["reward"]["budget"]["name"] == "toy"
    assert consumed["optimizer_steps"] == 2  # 8 prompts / 4 per rollout × 1 epoch
