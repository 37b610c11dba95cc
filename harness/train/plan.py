"""The training plan: every number a run's trainer needs, derived once from the configured budget.

``plan_training`` is the one place that turns a budget (``conf/budget/<name>.yaml``, never rewritten) and a
method into what its trainer runs: the rows, cut to the budget's lengths (``cut_to_budget``) and matched
(``harness.train.matching``), how many passes over them, the optimizer steps, the per-device micro-batch, the
gradient accumulation, the longest sequence and the precision. The sweep calls it once per run and the plan
travels with the ``TrainingJob``; ``harness.train.trl_support.trl_arguments`` maps it onto TRL's arguments and
methods with their own loop (PPO) read the same fields. A sub-run — a round of an on-policy method, RSO's DPO
pass, one of sDPO's chunks — gets its plan from ``TrainingPlan.for_rows``, by the same derivation.

Units: the budget's effective batch ``batch_pairs`` is counted in preference pairs; a method trains
``examples_per_pair`` examples per pair (1 on pairs and SFT rows and prompts, 2 on the unpaired view, k for the
group samplers RLOO / GRPO: their completions per prompt), so every method takes the same optimizer steps over
the same pairs under ``budget.match=examples``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from harness.errors import HarnessError
from harness.inputs.data import EXAMPLES_PER_PAIR, budget_rows, pairs_per_list, truncate_rows, view_rows
from harness.train.budget import Budget

# Slack for the chat template's own tokens (role markers, system prompt) on top of the budget's
# prompt + completion lengths; TRL truncates the whole sequence to max_length.
TEMPLATE_TOKENS = 48


@dataclass(frozen=True)
class TrainingPlan:
    """One run's training, resolved: what every adapter reads instead of re-deriving it from the budget."""

    budget: Budget                  # as configured: lengths, optimizer, schedule, LoRA, seed (never rewritten)
    view: str                       # the data view of ``rows`` (harness.inputs.data.VIEWS)
    rows: list[dict] = field(repr=False)     # training rows in that view, cut to the budget's lengths (cycled when matched)
    heldout: list[dict] = field(repr=False)  # held-out rows, same view, same cut
    visits: int                     # pair (or prompt) visits over the run: pairs in ``rows`` × ``epochs``
    epochs: int                     # passes the trainer makes over ``rows`` (1 when matching cycled them)
    optimizer_steps: int            # planned: epochs × Σ over batches of the method's updates per batch
    examples_per_pair: int          # examples per budget pair: 1 pairs / SFT / prompts, 2 unpaired, k group samplers
    micro_batch: int                # examples per device per forward pass (budget.micro_batch_pairs × examples_per_pair)
    gradient_accumulation: int      # micro-batches per optimizer step on each device
    world_size: int                 # data-parallel devices (torchrun's WORLD_SIZE)
    sequence_batch: int             # sequences per generation / judging / PPO forward pass: a micro-batch pair's two
    max_length: int                 # prompt + completion + TEMPLATE_TOKENS: the longest sequence a trainer keeps
    warmup_steps: int               # ⌈budget.warmup_ratio × optimizer_steps⌉, as transformers rounds a ratio
    precision: str                  # fp32 | bf16 | fp16: budget.precision with ``auto`` resolved on this machine
    matching: dict                  # budget.match's note for the record (harness.train.matching.matched_training)

    def for_rows(self, rows: list[dict]) -> "TrainingPlan":
        """The plan of a sub-run over ``rows`` (already in this plan's view and lengths): a round's labelled pairs,
        RSO's sampled pairs, an sDPO chunk. Same budget, passes, batch shape and precision; one optimizer step a
        batch (the sub-run is a pair trainer)."""
        return _derive(self.budget, self.view, rows, [], epochs=self.epochs, examples_per_pair=self.examples_per_pair,
                      matching=self.matching, world=self.world_size, precision=self.precision)

    def record(self) -> dict:
        """What the run's record keeps of its plan (``consumed``), beside what the run then did."""
        return {"planned_optimizer_steps": self.optimizer_steps, "micro_batch": self.micro_batch,
                "gradient_accumulation": self.gradient_accumulation, "precision": self.precision}


def cut_to_budget(rows: list[dict], tokenizer, budget: Budget) -> list[dict]:
    """``rows`` cut to the budget's prompt and completion lengths (``harness.inputs.data.truncate_rows``): the one
    cut every training, held-out and selection row goes through."""
    return truncate_rows(rows, tokenizer, max_prompt_tokens=budget.max_prompt_tokens,
                         max_completion_tokens=budget.max_completion_tokens)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# CPU instruction sets with native bf16 matmuls (``torch.cpu.get_capabilities()`` names): Intel AMX, AVX512_BF16
# (Intel Cooper Lake+, AMD Zen 4+), Arm's BF16 / SVE-BF16 extensions. Without one, bf16 autocast is emulated and slower
# than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")


def native_bf16() -> str | None:
    """Why this machine runs bf16 matmuls natively — ``"cuda"`` (a GPU with hardware bf16: Ampere or later, ROCm), or
    the CPU flag (``CPU_BF16_FLAGS``) — or None. Training runs on the GPU when one is visible, so its answer decides."""
    import torch

    if torch.cuda.is_available():
        return "cuda" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    capabilities = torch.cpu.get_capabilities()
    return next((flag for flag in CPU_BF16_FLAGS if capabilities.get(flag)), None)


def resolved_precision(precision: str) -> str:
    """``auto`` → bf16 where the hardware has native bf16 matmuls (``native_bf16``), else fp32; anything else as
    configured. bf16 is autocast: weights, gradients and optimizer state stay fp32, matmuls run in bf16."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def examples_per_pair(method) -> int:
    """A method's ``examples_per_pair`` (RLOO / GRPO: its generations per prompt), else by its data view."""
    default = EXAMPLES_PER_PAIR if method.data_view == "unpaired" else 1
    return int(getattr(method, "examples_per_pair", default))


def check_processes(budget: Budget, processes: int) -> None:
    """A budget's global batch splits over ``processes`` (each takes whole micro-batches: micro-batch × processes ×
    accumulation = ``batch_pairs``), or one line saying what to change."""
    per_step = budget.micro_batch_pairs * processes
    if budget.batch_pairs % per_step:
        raise HarnessError(f"launch.processes={processes}: budget.batch_pairs={budget.batch_pairs} is not a "
                           f"multiple of micro_batch_pairs×processes={per_step}; the global batch must split evenly")


def plan_training(budget: Budget, method, train_rows: list[dict], heldout_rows: list[dict], tokenizer, *,
                  sizes=None, match: bool = True, world: int | None = None) -> TrainingPlan:
    """The plan of ``method`` trained under ``budget`` on the sweep's normalized train / held-out rows.

    Takes the budget's pairs (``budget_rows``), cuts them to its lengths, matches them under ``budget.match``
    (``harness.train.matching.matched_training``; ``match=False`` for a stage outside the comparison, such as a
    reward model, which trains on ``budget.pairs`` for ``budget.epochs`` whatever ``budget.match``) and
    derives the rest. ``sizes`` are the matcher's model sizes (online cost models); ``world`` the devices.
    """
    from harness.train.matching import matched_training

    pairs = cut_to_budget(budget_rows(train_rows, budget.pairs), tokenizer, budget)
    if match:
        pairs, epochs, matching = matched_training(budget, method, pairs, tokenizer, sizes,
                                                   heldout_prompts=len(heldout_rows))
    else:
        epochs, matching = budget.epochs, {}
    heldout = view_rows(cut_to_budget(heldout_rows, tokenizer, budget), method.data_view)
    return _derive(budget, method.data_view, view_rows(pairs, method.data_view), heldout, epochs=epochs,
                  examples_per_pair=examples_per_pair(method), matching=matching,
                  world=world_size() if world is None else world, precision=resolved_precision(budget.precision),
                  updates_per_batch=getattr(method, "updates_per_batch", None))


def _derive(budget: Budget, view: str, rows: list[dict], heldout: list[dict], *, epochs: int, examples_per_pair: int,
           matching: dict, world: int, precision: str, updates_per_batch=None) -> TrainingPlan:
    """The numbers of a plan over ``rows`` (``plan_training`` and ``TrainingPlan.for_rows``; nothing else calls it).

    ``updates_per_batch(prompts) -> int`` is a method's optimizer steps per batch of ``prompts`` (RLOO / GRPO:
    ``num_iterations``; PPO: ``ppo_epochs`` × its minibatches); without it, one.
    """
    per_step = budget.micro_batch_pairs * world
    if view == "lists":
        return _derive_lists(budget, rows, heldout, epochs=epochs, matching=matching, world=world, precision=precision)
    if budget.batch_pairs % per_step:
        raise HarnessError(f"budget.batch_pairs={budget.batch_pairs} is not divisible by micro_batch_pairs×devices="
                           f"{per_step}")
    rows_per_pair = EXAMPLES_PER_PAIR if view == "unpaired" else 1  # an unpaired example is half a pair
    pairs = math.ceil(len(rows) / rows_per_pair)
    batches = [min(budget.batch_pairs, pairs - start) for start in range(0, pairs, budget.batch_pairs)]
    steps = epochs * sum(updates_per_batch(size) if updates_per_batch else 1 for size in batches)
    return TrainingPlan(
        budget=budget, view=view, rows=list(rows), heldout=list(heldout), visits=pairs * epochs, epochs=epochs,
        optimizer_steps=steps, examples_per_pair=examples_per_pair,
        micro_batch=budget.micro_batch_pairs * examples_per_pair, gradient_accumulation=budget.batch_pairs // per_step,
        world_size=world, sequence_batch=2 * budget.micro_batch_pairs,
        max_length=budget.max_prompt_tokens + budget.max_completion_tokens + TEMPLATE_TOKENS,
        warmup_steps=math.ceil(budget.warmup_ratio * steps), precision=precision, matching=matching)


def list_batches(budget: Budget, size: int, world: int) -> tuple[int, int, int]:
    """(lists per optimizer step, lists per device micro-batch, accumulation) for lists of ``size`` responses.

    A list of K counts as K − 1 pairs (``harness.inputs.data``): a step of ``budget.batch_pairs`` pairs holds
    max(1, batch_pairs // (K − 1)) lists, a micro-batch the largest count ≤ max(1, micro_batch_pairs // (K − 1))
    that splits the step evenly over the devices. For K = 2 these are the pair trainers' numbers.
    """
    per_list = pairs_per_list(size)
    step = max(1, budget.batch_pairs // per_list)
    if step % world:
        raise HarnessError(f"lists of {size}: an optimizer step of {step} lists does not split over {world} devices; "
                           f"make budget.batch_pairs // (K − 1) a multiple of the devices")
    micro = max(1, min(budget.micro_batch_pairs // per_list, step // world))
    while (step // world) % micro:
        micro -= 1
    return step, micro, step // (micro * world)


def _derive_lists(budget: Budget, rows: list[dict], heldout: list[dict], *, epochs: int, matching: dict, world: int,
                  precision: str) -> TrainingPlan:
    """The plan over list rows (view ``lists``): ``list_batches``' step and micro-batch, counted in lists;
    ``visits`` in pairs (K − 1 a list visit)."""
    size = max((len(row["responses"]) for row in rows), default=2)
    step, micro, accumulation = list_batches(budget, size, world)
    steps = epochs * math.ceil(len(rows) / step)
    pairs = sum(pairs_per_list(len(row["responses"])) for row in rows)
    return TrainingPlan(
        budget=budget, view="lists", rows=list(rows), heldout=list(heldout), visits=pairs * epochs, epochs=epochs,
        optimizer_steps=steps, examples_per_pair=1, micro_batch=micro, gradient_accumulation=accumulation,
        world_size=world, sequence_batch=2 * budget.micro_batch_pairs,
        max_length=budget.max_prompt_tokens + budget.max_completion_tokens + TEMPLATE_TOKENS,
        warmup_steps=math.ceil(budget.warmup_ratio * steps), precision=precision, matching=matching)
