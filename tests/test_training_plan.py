"""The training plan (harness/train/plan.py): steps, accumulation, visits and cut rows derived once, by hand-checked
numbers for every view and under ``budget.match=flops``; TRL's arguments are the plan; and nothing else in the code
re-derives them from the budget."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.errors import HarnessError
from harness.inputs.data import toy_binary_feedback_rows, toy_preference_rows
from harness.protocols import TrainingJob
from harness.train.budget import Budget
from harness.train.plan import TEMPLATE_TOKENS, plan_training
from harness.train.trl_support import trl_arguments
from methods.grpo import GRPO
from methods.ppo import PPO

REPO = Path(__file__).resolve().parent.parent
DPO_LIKE = SimpleNamespace(name="dpo", data_view="pairs", reference_based=True)
SIMPO_LIKE = SimpleNamespace(name="simpo", data_view="pairs", reference_based=False)
KTO_LIKE = SimpleNamespace(name="kto", data_view="unpaired", reference_based=True, forward_only_ratio=3.0)
SFT_LIKE = SimpleNamespace(name="sft", data_view="sft", reference_based=False)

PAIRS = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}], "source_row": n}
         for n, row in toy_preference_rows(12)]
PAIRS[1] = {**PAIRS[1], "chosen": "Certainly, " + "happy to help and more " * 20}  # longer than the budget's 12 tokens
BINARY = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}], "source_row": n}
          for n, row in toy_binary_feedback_rows(24)]


def budget(**changes) -> Budget:
    values = dict(name="b", pairs=8, epochs=2, max_prompt_tokens=24, max_completion_tokens=12, batch_pairs=4,
                  micro_batch_pairs=2, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="fp32", match="examples")
    values.update(changes)
    return Budget(**values)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_pairs_unpaired_and_sft_plan_the_same_steps(tokenizer):
    configured = budget()
    dpo = plan_training(configured, DPO_LIKE, PAIRS, PAIRS[8:11], tokenizer)
    # 8 pairs × 2 epochs = 16 visits; a pass is 2 batches of 4 pairs; 4 pairs a step = 2 per device × 2 accumulated
    assert (dpo.visits, dpo.epochs, dpo.optimizer_steps) == (16, 2, 4)
    assert (dpo.examples_per_pair, dpo.micro_batch, dpo.gradient_accumulation, dpo.world_size) == (1, 2, 2, 1)
    assert dpo.max_length == 24 + 12 + TEMPLATE_TOKENS and dpo.sequence_batch == 4 and dpo.precision == "fp32"
    assert len(dpo.rows) == 8 and len(dpo.heldout) == 3 and dpo.matching == {"match": "examples"}
    assert dpo.budget is configured
    # rows are cut to the budget's lengths
    assert len(tokenizer(dpo.rows[1]["chosen"], add_special_tokens=False)["input_ids"]) <= 12 < \
        len(tokenizer(PAIRS[1]["chosen"], add_special_tokens=False)["input_ids"])

    kto = plan_training(configured, KTO_LIKE, PAIRS, PAIRS[8:11], tokenizer)
    # two examples a pair, in a micro-batch twice as large: the same steps over the same pairs
    assert (len(kto.rows), kto.examples_per_pair, kto.micro_batch, kto.gradient_accumulation) == (16, 2, 4, 2)
    assert (kto.visits, kto.epochs, kto.optimizer_steps) == (16, 2, 4)
    assert [row["label"] for row in kto.rows[:2]] == [True, False] and len(kto.heldout) == 6

    sft = plan_training(configured, SFT_LIKE, PAIRS, [], tokenizer)
    assert (len(sft.rows), sft.micro_batch, sft.optimizer_steps) == (8, 2, 4) and "rejected" not in sft.rows[0]

    # binary feedback: budget.pairs = 8 buys 16 examples, KTO still takes DPO's steps
    binary = plan_training(configured, KTO_LIKE, BINARY, [], tokenizer)
    assert (len(binary.rows), binary.visits, binary.optimizer_steps) == (16, 16, 4)
    # a partial last batch is a step: 10 pairs in batches of 4 → 3 steps a pass
    assert plan_training(budget(pairs=10), DPO_LIKE, PAIRS, [], tokenizer).optimizer_steps == 2 * 3


def test_flops_matching_changes_visits_and_never_the_budget(tokenizer):
    configured = budget(match="flops")
    before = configured.as_dict()
    plans = {m.name: plan_training(configured, m, PAIRS, [], tokenizer) for m in (DPO_LIKE, SIMPO_LIKE, KTO_LIKE)}
    # the target is DPO's own cost of 8 pairs × 2 epochs; reference-free SimPO pays less a visit, KTO more
    assert plans["dpo"].visits == 16
    assert plans["simpo"].visits > 16 > plans["kto"].visits
    for plan in plans.values():
        assert plan.budget is configured and configured.as_dict() == before  # pairs 8, epochs 2: as configured
        assert plan.epochs == 1 and plan.visits == plan.matching["pair_visits"] and plan.matching["match"] == "flops"
        assert plan.optimizer_steps == math.ceil(plan.visits / configured.batch_pairs)
    simpo = plans["simpo"]
    assert len(simpo.rows) == simpo.visits and simpo.rows[8] == simpo.rows[0]  # the budget's pairs, cycled
    assert len(plans["kto"].rows) == 2 * plans["kto"].visits


def test_group_samplers_and_ppo_plan_their_steps_per_batch(tokenizer):
    configured = budget(pairs=10, epochs=1)
    grpo = plan_training(configured, GRPO(num_generations=4, num_iterations=2), PAIRS, [], tokenizer)
    # 4 completions a prompt in the micro-batch; 3 generation batches of ≤ 4 prompts, each trained μ = 2 times
    assert (grpo.examples_per_pair, grpo.micro_batch, grpo.gradient_accumulation) == (4, 8, 2)
    assert (grpo.visits, grpo.optimizer_steps) == (10, 3 * 2)
    ppo = plan_training(configured, PPO(ppo_epochs=2, minibatches=4), PAIRS, [], tokenizer)
    # rollout batches of 4, 4 and 2 prompts: 2 PPO epochs × (4 + 4 + 2) minibatches; passes of 4 sequences
    assert ppo.optimizer_steps == 2 * (4 + 4 + 2) and ppo.sequence_batch == 4


def test_a_sub_run_is_planned_the_same_way(tokenizer):
    plan = plan_training(budget(warmup_ratio=0.3), DPO_LIKE, PAIRS, PAIRS[8:11], tokenizer)
    sub = plan.for_rows(plan.rows[:5])  # a round's 5 labelled pairs
    assert (sub.visits, sub.epochs, sub.optimizer_steps, sub.warmup_steps) == (10, 2, 4, 2)  # ⌈0.3 × 4⌉
    assert (sub.budget, sub.micro_batch, sub.gradient_accumulation) == (plan.budget, 2, 2) and sub.heldout == []


def test_devices_share_the_accumulation(tokenizer):
    two = plan_training(budget(), DPO_LIKE, PAIRS, [], tokenizer, world=2)
    assert (two.gradient_accumulation, two.micro_batch, two.optimizer_steps) == (1, 2, 4)
    with pytest.raises(HarnessError, match=r"not divisible by micro_batch_pairs×devices=8"):
        plan_training(budget(), DPO_LIKE, PAIRS, [], tokenizer, world=4)


def test_trl_arguments_are_the_plan(tokenizer, tmp_path):
    plan = plan_training(budget(warmup_ratio=0.1), KTO_LIKE, PAIRS, [], tokenizer)
    job = TrainingJob(start_checkpoint=tmp_path, output_dir=tmp_path / "out", plan=plan, seed=0,
                      scratch_dir=tmp_path / "scratch")
    arguments = trl_arguments(job, learning_rate=1e-6)
    assert (arguments["per_device_train_batch_size"], arguments["gradient_accumulation_steps"]) == (4, 2)
    assert (arguments["num_train_epochs"], arguments["max_steps"], arguments["warmup_steps"]) == (2, 4, 1)
    assert arguments["max_length"] == plan.max_length and not arguments["bf16"] and not arguments["fp16"]
    assert job.budget is plan.budget  # the configured budget, for what is not derived


def test_nothing_rederives_the_plan():
    """Budgets offer no derived numbers; outside the plan no code cuts rows, reads the micro-batch, counts a budget's
    epochs or rewrites a budget."""
    assert not any(hasattr(Budget, name) for name in ("planned_steps", "gradient_accumulation"))
    allowed = {"micro_batch_pairs": {"harness/train/plan.py", "harness/train/budget.py"},
               "truncate_rows": {"harness/train/plan.py"},
               "epochs": {"harness/train/plan.py", "harness/train/matching.py"}}
    offenders = []
    files = [p for folder in ("harness", "methods", "tasks", "bench") for p in (REPO / folder).rglob("*.py")]
    for path in files:
        where = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("micro_batch_pairs", "epochs") and \
                    ast.unparse(node.value).endswith("budget"):  # budget, job.budget, self.budget, plan.budget, ...
                found = node.attr
            elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "truncate_rows":
                found = "truncate_rows"
            elif (isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "replace" and node.args
                  and ast.unparse(node.args[0]).endswith("budget")
                  and {k.arg for k in node.keywords} not in ({"seed"}, {"lora"})
                  and not (where == "harness/train/rewards.py" and {k.arg for k in node.keywords} == {"pairs"})):
                # a seed is a replicate (seeds=[...]); LoRA switched on is how a method parametrizes its update
                # (paft's two adapters), not what it trains on; reward.pairs is the config's own choice of the
                # reward model's budget (rewards.reward_budget, before any plan): none is a rewrite of the plan
                found = "replace(budget"
            else:
                continue
            if where not in allowed.get(found, set()):
                offenders.append(f"{where}:{node.lineno} {found}")
    assert not offenders, offenders
