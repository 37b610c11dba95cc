"""Matched budgets for online methods (harness/train/matching.py): each online method's cost model by hand, the clamp when
the target buys fewer visits than a method needs, and — through the real CLI on tiny-random — that the cost model
predicts what a run consumes and that ``budget.match=flops`` holds DPO and every online method to one FLOPs target."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from conftest import run_cli
from harness.train.budget import Budget
from harness.train.matching import ModelSizes, plan_visits
from harness.records import read_records
from methods.grpo import GRPO
from methods.iterative_dpo import IterativeDPO
from methods.online_dpo import OnlineDPO
from methods.ppo import PPO
from methods.rloo import RLOO

ONLINE = ["ppo", "rloo", "grpo", "online_dpo", "iterative_dpo"]


def budget(**changes) -> Budget:
    values = dict(name="b", pairs=4, epochs=1, max_prompt_tokens=8, max_completion_tokens=8, batch_pairs=2,
                  micro_batch_pairs=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="fp32", match="flops")
    values.update(changes)
    return Budget(**values)


def test_online_cost_models_by_hand():
    b = budget()
    # prompt 10 + completion 5 = s 15; a reward model half the policy's size that reads the policy's tokens
    sizes = ModelSizes(policy=100, reward=50, reward_reads_policy_tokens=True)
    # PPO, 4 epochs, value model from the reward model (N_value/N = .5): trained 4·15·(1 + .5) = 90;
    # forward-only 15·(generation + old + reference = 3, old values .5, reward .5) = 60
    assert PPO(ppo_epochs=4).visit_cost(10, 5, b, sizes) == (90.0, 60.0)
    # value_init=policy: a policy-sized value model (share 1): trained 4·15·2 = 120; forward 15·(3 + 1 + .5) = 67.5
    assert PPO(ppo_epochs=4, value_init="policy").visit_cost(10, 5, b, sizes) == (120.0, 67.5)
    # a reward model with another tokenizer: the value model starts from the policy too
    assert PPO(ppo_epochs=4).visit_cost(10, 5, b, ModelSizes(policy=100, reward=50))[0] == 120.0
    # RLOO, k = 2, μ = 3: 2·15 = 30 generated; trained 3·30 = 90; forward 30·(generation, old, reference, .5) = 105
    assert RLOO(num_generations=2, num_iterations=3).visit_cost(10, 5, b, sizes) == (90.0, 105.0)
    # GRPO, G = 4, μ = 1, β = 0: no old log-prob pass, no reference: 60 trained, 60·(1 + .5) = 90 forward
    assert GRPO(num_generations=4, beta=0.0).visit_cost(10, 5, b, sizes) == (60.0, 90.0)
    # online DPO: two samples (30 tokens) trained; generated, referenced, rewarded: 30·2.5 = 75
    assert OnlineDPO().visit_cost(10, 5, b, sizes) == (30.0, 75.0)
    # iterative DPO per prompt: the same as online DPO; plus per run (rounds + 1)·heldout greedy completions
    iterative = IterativeDPO(rounds=2, heldout_prompts=8)
    assert iterative.visit_cost(10, 5, b, sizes) == (30.0, 75.0)
    assert iterative.run_cost(10, 5, b, sizes, heldout_prompts=4) == (0.0, 3 * 4 * 15 * 1.5)  # only 4 held out
    assert iterative.visit_granularity(b) == (4, 2) and RLOO().visit_granularity(b) == (2, 2)


def test_flops_plan_for_online_methods_and_the_clamp():
    lengths = [(10, 5, 5)] * 4  # DPO target: 4 pairs × (6 + 2)·(2·10 + 5 + 5) = 960 per unit of N
    sizes = ModelSizes(policy=1)
    # online DPO, completions at the cap (8): a visit costs 6·36 + 2·72 = 360 → 960 / 360 = 2.67 → 3 visits
    plan = plan_visits(budget(), OnlineDPO(), lengths, sizes)
    assert (plan.visits, plan.target, plan.estimate, plan.met, plan.cost_model) == (3, 960.0, 1080.0, True, "method")
    # RLOO, k = 2, μ = 1 (old log-probs and reference): 6·36 + 2·3·36 = 432 a visit, in whole batches of 2 (864):
    # after one batch, half the next (432) would overshoot 960 → 2 visits
    assert plan_visits(budget(), RLOO(num_generations=2, beta=0.05), lengths, sizes).visits == 2
    # tokens: online DPO trains 36 tokens a visit against DPO's 4 × 30 = 120 → 3.33 → 3
    assert plan_visits(budget(match="tokens"), OnlineDPO(), lengths, sizes).visits == 3
    # iterative DPO with 3 rounds needs ≥ 3 × batch_pairs = 6 prompts; the target buys 2: clamped, not met
    clamped = plan_visits(budget(), IterativeDPO(rounds=3, heldout_prompts=0), lengths, sizes)
    assert clamped.visits == 6 and not clamped.met and clamped.estimate == 6 * 360.0
    # an online method without a cost model is priced like a pair method
    fallback = SimpleNamespace(data_view="pairs", reference_based=True)
    assert plan_visits(budget(), fallback, lengths, sizes).cost_model == "pairs"


# Completions that hit the cap: 4 new tokens, and default (warm) sampling temperatures and tiny learning rates
# on the random tiny model, which then practically never samples EOS (1 in ~49k tokens). A programmatic reward
# (no reward model) and batches of 2 prompts, so whole generation batches are a fine grain.
FLOPS_SWEEP = [
    "model=tiny-random", "data=toy-preference", "budget=toy", "budget@stage_budget=toy", "settings=[instruct]",
    "reward=short-answers", "reward.max_chars=32", "include_start=false", "tasks=[heldout_preference]",
    "+task_params.heldout_preference.limit=4", "budget.pairs=32", "budget.batch_pairs=2", "budget.micro_batch_pairs=2",
    "budget.max_completion_tokens=4", "budget.match=flops",
    "+method_params.iterative_dpo.rounds=2", "+method_params.iterative_dpo.heldout_prompts=8",
    "+method_params.iterative_dpo.min_improvement=-10",  # never stop early (rewards are in [0, 1]): all rounds run
]
# At the cap the cost model is the methods' own sums, so only what it cannot see remains: prompts rendered a few
# tokens differently by a trainer than by harness.train.matching.pair_lengths, and in iterative DPO the re-tokenized
# samples, the DPO rounds' end-of-turn tokens (+2 per completion, ~+3% here) and tied samples (no pair). Measured
# on this sweep: 1.000 for PPO, RLOO, GRPO and online DPO, 1.03 for iterative DPO.
COST_MODEL_TOLERANCE = 0.10
# DPO's own match (offline methods: within one pair visit); online methods: the cost model's error above plus
# up to half a visit (PPO, online DPO) or half a block (RLOO, GRPO: a generation batch; iterative DPO: one prompt
# per round) of granularity — GRPO's 2 prompts × 8 samples make the coarsest block. Measured: DPO 1.000,
# PPO 0.961, RLOO 1.011, GRPO 0.921, online DPO 0.993, iterative DPO 1.041.
OFFLINE_TOLERANCE, ONLINE_TOLERANCE = 0.05, 0.15


@pytest.fixture(scope="module")
def flops_sweep(tmp_path_factory, cache_dir) -> dict:
    folder = tmp_path_factory.mktemp("flops")
    result = run_cli("sweep", *FLOPS_SWEEP, f"methods=[dpo,{','.join(ONLINE)}]", f"paths.results={folder}", "name=f",
                     cache=cache_dir, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(folder / "f")}
    failed = {m: r["reason"] for m, r in records.items() if r["status"] != "ok"}
    assert not failed, failed
    return {m: r["consumed"] for m, r in records.items()}


def test_cost_model_predicts_what_an_online_run_consumes(flops_sweep):
    ratios = {}
    for method in ONLINE:
        consumed = flops_sweep[method]
        assert consumed["cost_model"] == "method" and consumed["match_met"], (method, consumed)
        # consumed / estimated FLOPs at the same visits = (consumed / target) / (estimate / target)
        ratios[method] = consumed["match_ratio"] / consumed["match_estimate"]
    print("consumed / cost-model FLOPs:", {m: round(r, 3) for m, r in ratios.items()})
    for method in ("rloo", "grpo", "online_dpo"):  # the premise: completions ran to the cap
        consumed = flops_sweep[method]
        assert consumed["completion_tokens"] == 4 * consumed["completions"], (method, consumed)
    bad = {m: r for m, r in ratios.items() if abs(r - 1) > COST_MODEL_TOLERANCE}
    assert not bad, bad


def test_flops_match_holds_every_method_to_one_target(flops_sweep):
    target = flops_sweep["dpo"]["match_target"]
    assert all(flops_sweep[m]["match_target"] == pytest.approx(target) for m in flops_sweep)
    ratios = {m: c["flops"] / target for m, c in flops_sweep.items()}
    print("consumed / target FLOPs:", {m: round(r, 3) for m, r in ratios.items()},
          "prompt visits:", {m: c["pair_visits"] for m, c in flops_sweep.items()})
    assert abs(ratios["dpo"] - 1) <= OFFLINE_TOLERANCE, ratios
    for method in ONLINE:
        assert abs(ratios[method] - 1) <= ONLINE_TOLERANCE, (method, ratios)
    # online methods pay far more per prompt than DPO per pair: they get fewer visits than DPO's 32
    assert all(flops_sweep[m]["pair_visits"] < flops_sweep["dpo"]["pair_visits"] for m in ONLINE)


def test_ppo_applies_the_budgets_precision(tmp_path, tiny_model, monkeypatch):
    """budget.precision=bf16: PPO's forward passes run under bf16 autocast (as TRL's bf16=True), and it is recorded."""
    import torch
    from safetensors.torch import load_file

    import methods.ppo as ppo
    from transformers import AutoTokenizer

    from harness.protocols import TrainingJob
    from harness.train.plan import plan_training
    from harness.train.rewards import ShortAnswers

    seen = []
    original = ppo.completion_logprobs

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo, "completion_logprobs", spy)
    rows = [{"prompt": [{"role": "user", "content": f"Request {n}: please describe the sea."}], "chosen": "Yes.",
             "rejected": "No."} for n in range(4)]
    method = PPO(ppo_epochs=1, learning_rate=1e-3)
    plan = plan_training(budget(precision="bf16", max_completion_tokens=4, match="examples"), method, rows, [],
                         AutoTokenizer.from_pretrained(tiny_model))
    job = TrainingJob(start_checkpoint=tiny_model, output_dir=tmp_path / "out", plan=plan, seed=0,
                      scratch_dir=tmp_path / "scratch", reward=ShortAnswers(max_chars=32))
    outcome = method.train(job)
    assert outcome.extra["precision"] == "bf16" and outcome.optimizer_steps == 2  # 4 prompts, 2 per rollout
    assert seen and set(seen) == {torch.bfloat16}, seen  # every log-prob pass: old, reference and trained
    assert all(math.isfinite(c["loss"]) for c in outcome.curves)
    start, trained = load_file(next(tiny_model.glob("*.safetensors"))), load_file(tmp_path / "out" / "model.safetensors")
    assert trained["model.norm.weight"].dtype == torch.float32  # weights stay fp32
    assert any(not torch.equal(start[name], trained[name]) for name in start)


def test_model_sizes_without_safetensors_count_the_architecture(tiny_model, monkeypatch):
    """Weights in another format than safetensors: the policy's size comes from its config, built on the meta
    device (no memory), and equals the loaded model's parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    import harness.train.rewards as rewards

    monkeypatch.setattr(rewards, "parameter_count", lambda folder: 0)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert ModelSizes.of(tiny_model).policy == sum(p.numel() for p in loaded.parameters())
