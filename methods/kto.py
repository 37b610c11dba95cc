"""KTO — Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306), via TRL's KTOTrainer.

Trains on unpaired desirable / undesirable examples. From preference pairs each pair yields one
desirable (chosen) and one undesirable (rejected) example, so a KTO batch holds twice as many
examples as a DPO batch over the same pairs and both take the same optimizer steps.

Loss (eq. 8): L = E[ λ_y − v(x, y) ] with
  v = λ_D·σ(β(r(x,y) − z0)) for desirable y,  λ_U·σ(β(z0 − r(x,y))) for undesirable y,
  r = log πθ(y|x)/π_ref(y|x), z0 = a micro-batch estimate of KL(πθ‖π_ref) from mismatched pairs.
The paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]. By default (``desirable_weight`` and
``undesirable_weight`` null) the weights are set from the training rows' own counts n_D, n_U
(``kto_class_weights``: λ_U = 1, λ_D = ``weight_ratio``·n_U/n_D): balanced data from pairs gives
λ_D = λ_U = 1, natively unpaired binary feedback (``harness.inputs.data``, ``format: binary``) whatever
corrects its imbalance. The record's ``consumed`` says which counts and weights were used.

The mismatched pairs of z0: TRL (1.16, ``KTOTrainer._prepare_dataset``) gives each row of a micro-batch the
completion of the row before it (the first row: the last row's) and trains the rows in order (a sequential sampler,
``KTOConfig.train_sampling_strategy``'s default), so the trainer's ``seed`` / ``data_seed`` never reach the data order.
``seeded_pair_order`` therefore shuffles whole pairs with the run's seed (as the pair trainers' random sampler does
with theirs). The unpaired view puts a pair's chosen and rejected rows side by side, which paired half the KL
completions with their own prompt; ``kl_batch_order`` then reorders the rows within each optimizer step (the same
rows, so the same steps over the same pairs). What holds:

* every KL pair joins a completion to another prompt, unless one prompt fills more than half a micro-batch (a last
  step of a single pair; binary feedback repeating a prompt that often), where no order can avoid it;
* on preference pairs with distinct prompts no micro-batch repeats a prompt when a step has two or more full
  micro-batches (budget=micro, smoke, standard); budget=toy's steps are one micro-batch, holding both rows of a pair.

The record's ``consumed.kl_pairs_sharing_prompt`` counts the KL pairs that share a prompt in the dataset TRL built.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from harness.errors import HarnessError
from harness.inputs.data import EXAMPLES_PER_PAIR
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import count_tokens, epochs_fraction, finish, peft_config, to_conversational, trl_arguments


class KTO:
    data_view = "unpaired"
    reference_based = True
    # forward-only tokens per trained token: the reference scores completions and the mismatched KL
    # completions, and the policy scores the KL completions without gradient (harness.train.matching)
    forward_only_ratio = 3.0

    def __init__(self, name: str = "kto", beta: float = 0.1, learning_rate: float = 5e-7,
                 desirable_weight: float | None = None, undesirable_weight: float | None = None,
                 weight_ratio: float = 1.0, data_order: str = "seeded"):
        if data_order not in ("seeded", "sequential"):
            raise HarnessError(f"method_params.kto.data_order={data_order!r} is not one of seeded, sequential; choose one")
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.weight_ratio = weight_ratio
        # seeded: the pairs are shuffled by the run's seed before kl_batch_order (seeded_pair_order); sequential: the
        # plan's order, as TRL trains its rows (before this knob KTO did that, so every seed trained the same model).
        # Part of the run id: checkpoints trained in the old order are not reused.
        self.data_order = data_order


    def class_weights(self, rows: list[dict]) -> dict:
        """(λ_D, λ_U) for ``rows`` and the counts behind them: a weight left null is set from the counts so that
        λ_D·n_D / (λ_U·n_U) = ``weight_ratio`` (``kto_class_weights``); a weight given is used as is."""
        desirable = sum(1 for row in rows if row["label"])
        undesirable = len(rows) - desirable
        weights = {"desirable_examples": desirable, "undesirable_examples": undesirable}
        undesirable_weight = 1.0 if self.undesirable_weight is None else float(self.undesirable_weight)
        if self.desirable_weight is not None:
            desirable_weight = float(self.desirable_weight)
        else:
            try:
                desirable_weight = undesirable_weight * kto_class_weights(desirable, undesirable, self.weight_ratio)[0]
            except ValueError as error:
                raise HarnessError(f"{self.name}: {error}; set +method_params.{self.name}.desirable_weight and "
                                   f"undesirable_weight by hand, or use data with both labels") from None
        weights.update(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        if desirable and undesirable:
            weights["weighted_ratio"] = round(desirable_weight * desirable / (undesirable_weight * undesirable), 4)
        return weights

    def trainer(self, job: TrainingJob):
        """TRL's KTOTrainer over the plan's rows in ``kl_batch_order``, ready to train (its dataset prepared)."""
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl import KTOConfig

        from harness.train.trl_extensions import HarnessKTOTrainer

        plan = job.plan
        weights = self.class_weights(plan.rows)
        arguments = trl_arguments(job, learning_rate=self.learning_rate)
        config = KTOConfig(**arguments, beta=self.beta, desirable_weight=weights["desirable_weight"],
                           undesirable_weight=weights["undesirable_weight"])
        # TRL trains KTO's rows in dataset order (KTOConfig.train_sampling_strategy="sequential"), so the seed orders
        # them here: whole pairs shuffled, then each step reordered for mismatched KL pairs
        ordered = seeded_pair_order(plan.rows, job.budget.seed) if self.data_order == "seeded" else plan.rows
        rows = kl_batch_order(ordered, micro_batch=plan.micro_batch,
                              step_rows=plan.micro_batch * plan.gradient_accumulation * plan.world_size)
        # TRL's KTOTrainer, scoring faster on the CPU (harness.train.trl_extensions), z0 per process (local_kl_trainer)
        return local_kl_trainer(HarnessKTOTrainer)(
            model=str(job.start_checkpoint),
            args=config,
            train_dataset=Dataset.from_list(to_conversational(rows)),
            processing_class=load_tokenizer(job.start_checkpoint),
            peft_config=peft_config(job),
        )

    def train(self, job: TrainingJob) -> TrainingOutcome:
        trainer = self.trainer(job)
        config = trainer.args
        shared = kl_pairs_sharing_prompt(trainer.train_dataset, config.per_device_train_batch_size)
        trainer.train()
        rows = len(job.plan.rows)
        passes = epochs_fraction(trainer, job)
        trained = count_tokens(trainer.train_dataset, ["completion_ids"], config.max_length)
        kl_columns = ["KL_completion_ids"] if "KL_completion_ids" in trainer.train_dataset.column_names else []
        kl = count_tokens(trainer.train_dataset, kl_columns, config.max_length) if kl_columns else 0
        # The policy's KL-estimate pass runs without gradients: forward-only, like the reference's two passes.
        return finish(trainer, job, examples=round(passes * rows), pairs=passes * rows / 2,
                      policy_tokens=round(passes * trained), reference_tokens=round(passes * (trained + 2 * kl)),
                      extra={"class_weights": self.class_weights(job.plan.rows), "kl_pairs_sharing_prompt": shared})


# The line of TRL's KTOTrainer._compute_loss (1.16) that averages z0 over the processes; local_kl_trainer keeps it local
TRL_KL_GATHER = "kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)"


def local_kl_trainer(trainer_class):
    """``trainer_class`` (TRL's ``KTOTrainer`` or a subclass) with z0 estimated from each process's own micro-batch, as
    a 1-process run does, so a run's numbers do not depend on how many processes train it (``harness.run.launch``).

    TRL averages the micro-batch KL estimates of all processes (one ``gather_for_metrics``, the first in
    ``_compute_loss``), so with N processes z0 comes from N micro-batches at once: a different estimate (tiny model,
    lr 1e-3, second step: loss 0.4786 at 1 process, 0.4590 at 2 with TRL's gather, 0.4786 with this override). The
    override answers that one gather with the local value; every other gather (the logged metrics) is TRL's. With one
    process nothing changes.
    """
    import inspect

    from trl import KTOTrainer

    class LocalKLTrainer(trainer_class):
        def _compute_loss(self, model, inputs, return_outputs):
            if self.accelerator.num_processes == 1 or not self.calculate_KL:
                return super()._compute_loss(model, inputs, return_outputs)
            source = inspect.getsource(KTOTrainer._compute_loss)
            first_gather = source.find("gather_for_metrics")
            if TRL_KL_GATHER not in source or first_gather != source.index(TRL_KL_GATHER) + TRL_KL_GATHER.index("gather_"):
                raise HarnessError("TRL's KTOTrainer no longer averages z0 with its first gather_for_metrics; revisit "
                                   "methods/kto.py (local_kl_trainer)")
            gather, calls = self.accelerator.gather_for_metrics, []

            def local_first(value, *args, **kwargs):
                calls.append(value)
                return value if len(calls) == 1 else gather(value, *args, **kwargs)

            self.accelerator.gather_for_metrics = local_first
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                del self.accelerator.gather_for_metrics  # the instance attribute: the class's method again

    LocalKLTrainer.__name__ = f"LocalKL{trainer_class.__name__}"
    return LocalKLTrainer


def seeded_pair_order(rows: list[dict], seed: int) -> list[dict]:
    """``rows`` with their pairs in an order drawn from ``random.Random(seed)``: a pair is ``EXAMPLES_PER_PAIR``
    consecutive rows (a preference pair's desirable and undesirable example; two examples of binary feedback, as the
    budget counts them), kept together so that every optimizer step holds whole pairs. TRL's KTOTrainer trains in
    dataset order (a sequential sampler, which its KL pairs need), so this is where KTO's data order follows the seed,
    as TRL's random sampler (``data_seed``) makes the pair trainers' order follow it."""
    pairs = [rows[start:start + EXAMPLES_PER_PAIR] for start in range(0, len(rows), EXAMPLES_PER_PAIR)]
    random.Random(seed).shuffle(pairs)
    return [row for pair in pairs for row in pair]


def kl_batch_order(rows: list[dict], *, micro_batch: int, step_rows: int) -> list[dict]:
    """``rows`` reordered within each optimizer step (``step_rows`` consecutive rows) so that TRL's KL pairs are
    mismatched: each row of a ``micro_batch`` gets the previous row's completion (the first: the last row's).

    Per step, the rows, grouped by prompt and largest group first, each go to the micro-batch holding the fewest rows
    of their prompt (then the one with most room), which spreads a prompt over different micro-batches; then each
    micro-batch is ordered by ``_no_neighbour_shares_a_prompt``.
    """
    ordered = []
    for start in range(0, len(rows), step_rows):
        step = rows[start:start + step_rows]
        room = [min(micro_batch, len(step) - first) for first in range(0, len(step), micro_batch)]
        batches, prompts = [[] for _ in room], [Counter() for _ in room]
        for row in _grouped_by_prompt(step):
            key = prompt_key(row)
            batch = min((index for index, free in enumerate(room) if free),
                        key=lambda index: (prompts[index][key], -room[index]))
            batches[batch].append(row)
            prompts[batch][key] += 1
            room[batch] -= 1
        ordered += [row for batch in batches for row in _no_neighbour_shares_a_prompt(batch)]
    return ordered


def prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True)


def _grouped_by_prompt(rows: list[dict]) -> list[dict]:
    """``rows`` with each prompt's rows together, the prompts with most rows first (ties: first seen first)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row), []).append(row)
    return [row for group in sorted(groups.values(), key=len, reverse=True) for row in group]


def _no_neighbour_shares_a_prompt(batch: list[dict]) -> list[dict]:
    """``batch`` in an order where no row (cyclically) follows a row of its own prompt, whenever one exists.

    The rows grouped by prompt, largest group first, fill the even places, then the odd ones; neighbours then share a
    prompt only if it holds more than half the rows, and then every cyclic order has such a neighbour.
    """
    grouped = _grouped_by_prompt(batch)
    half = (len(grouped) + 1) // 2
    out = [None] * len(grouped)
    out[0::2], out[1::2] = grouped[:half], grouped[half:]
    return out


def kl_sources(length: int, micro_batch: int) -> list[int]:
    """For each row of a TRL KTO training dataset of ``length`` rows, the row whose completion is its KL completion:
    the previous row in its micro-batch of ``micro_batch`` consecutive rows, the first taking the last's."""
    sources = []
    for start in range(0, length, micro_batch):
        size = min(micro_batch, length - start)
        sources += [start + (offset - 1) % size for offset in range(size)]
    return sources


def kl_pairs_sharing_prompt(dataset, micro_batch: int) -> int:
    """How many KL pairs of TRL's prepared KTO dataset join a completion to its own prompt (token ids compared)."""
    if "KL_completion_ids" not in dataset.column_names:
        return 0
    prompts, completions = dataset["prompt_ids"], dataset["completion_ids"]
    sources = kl_sources(len(dataset), micro_batch)
    if any(kl != completions[source] for kl, source in zip(dataset["KL_completion_ids"], sources)):
        raise HarnessError("TRL's KTOTrainer no longer takes each row's KL completion from the previous row of its "
                           "micro-batch; revisit methods/kto.py (kl_batch_order)")
    return sum(prompts[row] == prompts[source] for row, source in enumerate(sources))


def kto_class_weights(n_desirable: int, n_undesirable: int, ratio: float = 1.0) -> tuple[float, float]:
    """(λ_D, λ_U) for imbalanced binary feedback, as the KTO paper prescribes: keep
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] (Ethayarajh et al. 2024; the paper's example: with one desirable
    per ten undesirable examples, λ_U = 1 and λ_D ∈ [10, 13.33]).

    λ_U stays 1 and λ_D = ratio·n_U/n_D, so the weighted ratio is exactly ``ratio`` (default 1, the lower
    end: balanced data from pairs gives λ_D = λ_U = 1). Pass the result as ``desirable_weight`` and
    ``undesirable_weight``.
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise ValueError(f"KTO needs desirable and undesirable examples; got {n_desirable} and {n_undesirable}")
    if not 1.0 <= ratio <= 4.0 / 3.0:
        raise ValueError(f"the KTO paper keeps λ_D·n_D/(λ_U·n_U) in [1, 4/3]; got ratio={ratio}")
    return ratio * n_undesirable / n_desirable, 1.0
