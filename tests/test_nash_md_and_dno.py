"""Nash-MD (methods/nash_md.py: Munos et al. 2023, Nash-MD-PG on TRL's online trainer) and DNO (methods/dno.py: Rosset
et al. 2024, DNO-Prct on the round loop): their pure pieces by hand, the Nash-MD loss moving a real model the right way,
and both through the real CLI on tiny-random with the reward and with a pairwise judge as the preference oracle."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from harness.records import read_records
from methods.dno import DNO, large_margin_pairs
from methods.nash_md import NashMD, geometric_mixture_logits, nash_md_loss


def test_nash_md_loss_by_hand():
    # one sample of two tokens, log π = (−1, −2): log π(y) = −3; p = 0.8, τ = 0.1
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1]])
    preference = torch.tensor([0.8])
    # μ(y) = π(y): no KL term, L = −(0.8 − ½)·(−3) = 0.9
    loss, score, log_ratio = nash_md_loss(policy, torch.tensor([[-1.5, -1.5]]), mask, preference, 0.1)
    assert loss.item() == pytest.approx(0.9) and score.item() == pytest.approx(-0.9) and log_ratio.item() == 0.0
    # log μ = (−1, −1): log π(y)/μ(y) = −1, L = 0.9 + 0.1·(−1)·(−3) = 1.2; ∂L/∂log π_t = −(p − ½ − τ·ratio) = −0.4
    loss, _, log_ratio = nash_md_loss(policy, torch.tensor([[-1.0, -1.0]]), mask, preference, 0.1)
    assert loss.item() == pytest.approx(1.2) and log_ratio.item() == pytest.approx(-1.0)
    loss.backward()
    assert policy.grad.tolist() == [[pytest.approx(-0.4), pytest.approx(-0.4)]]
    # a masked (padding) token counts nowhere; a batch is averaged: p = ½ contributes nothing
    loss, _, _ = nash_md_loss(torch.tensor([[-1.0, -5.0], [-2.0, -2.0]]), torch.tensor([[-1.0, 0.0], [-2.0, -2.0]]),
                              torch.tensor([[1, 0], [1, 1]]), torch.tensor([1.0, 0.5]), 0.1)
    assert loss.item() == pytest.approx((0.5 * 1.0 + 0.0) / 2)


def test_geometric_mixture_by_hand():
    # π = (½, ½), μ = (0.9, 0.1): π^½ μ^½ ∝ (√.45, √.05) = (3, 1)·√.05 → (¾, ¼)
    policy, reference = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.9, 0.1]]))
    mixed = geometric_mixture_logits(policy, reference, 0.5).exp()
    assert mixed.tolist() == [[pytest.approx(0.75), pytest.approx(0.25)]]
    assert geometric_mixture_logits(policy, reference, 0.0).exp().tolist() == [[pytest.approx(0.5), pytest.approx(0.5)]]
    assert geometric_mixture_logits(policy + 7.0, reference, 1.0).exp().tolist() == [[pytest.approx(0.9),
                                                                                    pytest.approx(0.1)]]


def test_large_margin_pairs_by_hand():
    prompts = ["a", "b", "c"]
    candidates = [["x", "y", "gold"], ["u", "v", "w"], ["s", "t", "gold"]]
    matrices = [
        # win rates (row means): (0.5+0.7+0.2)/3 = 0.4667, (0.3+0.5+0.1)/3 = 0.3, (0.8+0.9+0.5)/3 = 0.7333: gold ≻ y
        [[0.5, 0.7, 0.2], [0.3, 0.5, 0.1], [0.8, 0.9, 0.5]],
        [[0.5] * 3] * 3,  # all tie: no preference
        # (0.5+0.55+0.5)/3 = 0.5167, (0.45+0.5+0.5)/3 = 0.4833, 0.5: a gap of 0.0333 < margin 0.05
        [[0.5, 0.55, 0.5], [0.45, 0.5, 0.5], [0.5, 0.5, 0.5]],
    ]
    pairs, counts = large_margin_pairs(prompts, candidates, matrices, 0.05)
    assert pairs == [{"prompt": "a", "chosen": "gold", "rejected": "y"}]
    assert counts["ties"] == 1 and counts["filtered"] == 1 and counts["margins"] == [pytest.approx(1.3 / 3)]
    assert len(large_margin_pairs(prompts, candidates, matrices, 0.0)[0]) == 2  # no filter: only the tie drops


def test_cost_models_by_hand():
    budget = SimpleNamespace(batch_pairs=4)
    sizes = SimpleNamespace(reward_share=0.5)
    # prompt 10 + completion 5 = 15. Nash-MD: the policy sample trained (15); forward-only: 2 samples generated (30),
    # the reference alongside the mixture's sampling (15) and on the policy sample (15), the reward on both (30·½)
    assert NashMD().visit_cost(10, 5, budget, sizes) == (15.0, 75.0)
    # a judge: the pair in both orders, 2 × (95 template tokens + 10 + 2·5), policy-sized
    judged = NashMD(judge={"type": "local_hf", "model": "tiny-random:3"})
    assert judged.visit_cost(10, 5, budget, sizes) == (15.0, 60.0 + 230) and not judged.needs_reward
    # DNO, K = 5 + the gold: 75 generated, 6 candidates × 15 × ½ rewarded, one pair trained (30) and referenced (30)
    assert DNO(samples=5).visit_cost(10, 5, budget, sizes) == (30.0, 75 + 45 + 30)
    # a judge over 6 candidates: 6·5 ordered comparisons × 115 = 3450
    assert DNO(samples=5, judge={"type": "local_hf", "model": "tiny-random:3"}).visit_cost(10, 5, budget, sizes) == \
        (30.0, 75 + 3450 + 30)
    assert DNO(rounds=3).visit_granularity(budget) == (12, 3) and DNO().needs_reward


def test_nash_md_gradient_moves_a_real_policy_toward_the_preferred_sample(tiny_model):
    """One SGD step on the loss through the tiny model raises log π(y) of a sample the preference favours (p = 1) and
    lowers it for a disfavoured one (p = 0): the learning signal, with the reference = the start (no KL pull yet)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    prompt_length = 3

    def completion_logps(model):
        logits = model(ids).logits[:, prompt_length - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_length:, None]).squeeze(-1)

    for preference, direction in ((1.0, 1), (0.0, -1)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        reference = completion_logps(model).detach()
        before = reference.sum().item()
        loss, _, _ = nash_md_loss(completion_logps(model), reference, torch.ones_like(reference),
                                  torch.tensor([preference]), 0.1)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        after = completion_logps(model).sum().item()
        assert direction * (after - before) > 0, (preference, before, after)


# shrunk as tests/test_rewards_and_online.py's ONLINE_SWEEP (4-token completions, learning rates for a 3M random model)
SWEEP = [
    "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "include_start=false", "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4",
    "budget.pairs=16", "budget.batch_pairs=4", "budget.micro_batch_pairs=4", "budget.max_completion_tokens=4",
    "+method_params.nash_md.learning_rate=1e-3",
    "+method_params.dno.learning_rate=1e-3", "+method_params.dno.rounds=2", "+method_params.dno.samples=3",
]
JUDGE = ["+method_params.{m}.judge.type=local_hf", "+method_params.{m}.judge.model=tiny-random:3"]


def curves(folder, record) -> list[dict]:
    lines = (folder / "curves" / f"{record['run_id']}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def changed_everywhere(cache_dir, record) -> bool:
    from safetensors.torch import load_file

    start = load_file(next((cache_dir / "models" / "tiny-random-3").glob("*.safetensors")))
    trained = load_file(next((cache_dir / "checkpoints" / record["run_id"]).glob("*.safetensors")))
    return not [name for name, tensor in start.items() if torch.equal(tensor, trained[name])]


@pytest.mark.slow
def test_nash_md_and_dno_with_the_reward_through_the_cli(tmp_path, cache_dir):
    # the margin filter on: short-answers' spread of rewards leaves pairs above it (tiny-random:3 as a judge does not)
    result = run_cli("sweep", *SWEEP, "reward=short-answers", "reward.max_chars=32", "+method_params.dno.margin=0.01",
                     "methods=[nash_md,dno]",
                     f"paths.results={tmp_path}", "name=r", cache=cache_dir, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "r"
    records = {r["method"]: r for r in read_records(folder)}
    failed = {m: r["reason"] for m, r in records.items() if r["status"] != "ok"}
    assert set(records) == {"nash_md", "dno"} and not failed, failed
    for method, record in records.items():
        consumed = record["consumed"]
        assert consumed["oracle"] == "reward (Bradley-Terry link)" and consumed["reward"]["kind"] == "short-answers"
        assert consumed["generation_tokens"] > 0 and consumed["reference_tokens"] >= consumed["generation_tokens"]
        assert consumed["flops"] > 0 and changed_everywhere(cache_dir, record), method
    nash = records["nash_md"]["consumed"]
    # 16 prompts, 4 a step: 4 steps, each prompt one policy and one mixture sample
    assert nash["optimizer_steps"] == 4 and nash["completions"] == 32 and nash["pairs"] == 16
    assert nash["generation_tokens"] == nash["policy_sample_tokens"] + nash["mixture_sample_tokens"]
    steps = [c for c in curves(folder, records["nash_md"]) if "loss" in c]
    assert len(steps) == 4 and all(0 <= c["preference"] <= 1 and c["mixture_coef"] == 0.125 for c in steps)
    # step 1: the policy is its reference, the KL term is zero and the loss is the score term alone
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5) and steps[0]["loss"] == pytest.approx(-steps[0]["score"], abs=1e-3)
    assert any(c["kl"] != 0 for c in steps[1:])  # the policy moved away from its reference
    dno = records["dno"]["consumed"]
    # 2 rounds of 8 prompts: every prompt gives a pair, is filtered by the margin, or ties
    assert dno["rounds_done"] == 2 and sum(dno["round_pairs"]) + sum(dno["round_ties_dropped"]) == 16
    assert all(m is None or m >= 0.01 for m in dno["round_mean_margins"])
    assert dno["pairs"] == sum(dno["round_pairs"]) and dno["chosen_round"] == 2
    # each round's DPO starts where its reference is (the previous round's policy): −log σ(0) = ln 2 at its first step
    first = {}
    for entry in curves(folder, records["dno"]):
        if "loss" in entry and entry["round"] not in first:
            first[entry["round"]] = entry["loss"]
    assert first == {1: pytest.approx(math.log(2), abs=1e-4), 2: pytest.approx(math.log(2), abs=1e-4)}


@pytest.mark.slow
def test_nash_md_and_dno_with_a_pairwise_judge_through_the_cli(tmp_path, cache_dir):
    judged = [j.format(m=m) for m in ("nash_md", "dno") for j in JUDGE]
    result = run_cli("sweep", *SWEEP, *judged, "methods=[nash_md,dno]", f"paths.results={tmp_path}", "name=j",
                     cache=cache_dir, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "j")}
    failed = {m: r["reason"] for m, r in records.items() if r["status"] != "ok"}
    assert set(records) == {"nash_md", "dno"} and not failed, failed
    for method, record in records.items():
        consumed = record["consumed"]
        assert "reward" not in record["run_config"] and consumed["oracle"] == "judge", method
        assert consumed["judgments"] > 0 and consumed["judge_tokens"] > 2 * 95 * consumed["judgments"]
        assert consumed["judge_parameters"] == consumed["parameters"]  # tiny-random:3 judges a tiny-random:3 policy
        assert consumed["reference_tokens"] >= consumed["generation_tokens"] + consumed["judge_tokens"]
        assert changed_everywhere(cache_dir, record), method
    nash = records["nash_md"]["consumed"]
    assert nash["judgments"] <= 16 and nash["completions"] == 32  # at most one judgment a prompt (identical: none)
