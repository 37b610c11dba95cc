"""KTO's KL estimate z0 from mismatched pairs (methods/kto.py): TRL gives each row of a micro-batch the previous row's
completion, so the adapter orders the unpaired view (``kl_batch_order``) so that no KL completion meets its own
prompt — counted on the dataset TRL builds and on the micro-batches its dataloader forms — over the same rows per
optimizer step as before."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter

import pytest
from omegaconf import OmegaConf

import methods.kto as kto
from conftest import DATA_MIRROR, REPO, assert_same_loss_and_gradients, one_micro_batch_step
from harness.inputs.data import load_preference_rows, split_data
from harness.protocols import TrainingJob
from harness.run.registry import CONF_DIR
from harness.train.budget import Budget
from harness.train.plan import plan_training
from methods.kto import KTO, kl_batch_order, kl_pairs_sharing_prompt, kl_sources, prompt_key

MICRO = Budget.from_config(OmegaConf.load(REPO / "conf" / "budget" / "micro.yaml"))
# budget=smoke's shape: 16 pairs = 32 examples, steps of 8 pairs, micro-batches of 4 pairs (8 examples)
SMOKE_SHAPE = dataclasses.replace(MICRO, pairs=16, batch_pairs=8, micro_batch_pairs=4)
# budget=toy's shape: one micro-batch per step, so a step's micro-batch holds each pair's two rows
TOY_SHAPE = dataclasses.replace(MICRO, pairs=16, batch_pairs=4, micro_batch_pairs=4)


def train_rows(data: str) -> list[dict]:
    cfg = OmegaConf.load(CONF_DIR / "data" / f"{data}.yaml")
    if data == "hh-harmless" and not (DATA_MIRROR / cfg.mirror_file).exists():
        pytest.skip(f"no {cfg.mirror_file} under {DATA_MIRROR}")
    rows, _ = load_preference_rows(cfg, DATA_MIRROR)
    return split_data(rows, cfg)[0]


def repeated_prompt_feedback(size: int) -> list[dict]:
    """Binary feedback listing three completions per prompt one after the other (as kto-mix-14k may)."""
    return [{"prompt": [{"role": "user", "content": f"Question {index // 3}: name a colour."}],
             "completion": f"Colour {index}.", "label": index % 3 == 0, "source_row": index + 1}
            for index in range(size)]


def kto_job(tmp_path, model, rows, budget) -> TrainingJob:
    """A KTO job planned as the sweep plans it."""
    from transformers import AutoTokenizer

    plan = plan_training(budget, KTO(), rows, [], AutoTokenizer.from_pretrained(model))
    return TrainingJob(start_checkpoint=model, output_dir=tmp_path / "out", plan=plan, seed=0,
                       scratch_dir=tmp_path / "scratch")


def micro_batches(trainer) -> list[list[dict]]:
    """Every training micro-batch as TRL's dataloader forms it (one pass): per row its prompt, completion, KL prompt and
    KL completion token ids, read back from the collated tensors."""
    batches = []
    for batch in trainer.get_train_dataloader():
        rows = []
        for index in range(len(batch["label"])):
            row = {}
            for prefix in ("", "KL_"):
                ids, mask = batch[f"{prefix}input_ids"][index], batch[f"{prefix}attention_mask"][index].bool()
                completion = batch[f"{prefix}completion_mask"][index].bool()
                row[f"{prefix}prompt"] = tuple(ids[mask & ~completion].tolist())
                row[f"{prefix}completion"] = tuple(ids[completion].tolist())
            rows.append(row)
        batches.append(rows)
    return batches


@pytest.mark.parametrize("data, budget, before", [
    ("toy-preference", SMOKE_SHAPE, 16),     # the outside check's finding: 16 of 32 KL pairs share a prompt
    ("hh-harmless", SMOKE_SHAPE, 16),
    ("toy-preference", TOY_SHAPE, 16),
    ("binary", SMOKE_SHAPE, 19),             # three rows a prompt in a row: 21 follow their own prompt, 2 open a batch
])
def test_no_kl_pair_shares_a_prompt(tmp_path, tiny_model, monkeypatch, data, budget, before):
    rows = repeated_prompt_feedback(48) if data == "binary" else train_rows(data)
    job = kto_job(tmp_path, tiny_model, rows, budget)
    plan = job.plan
    assert len(plan.rows) == 32 and plan.micro_batch == 2 * budget.micro_batch_pairs
    trainer = KTO().trainer(job)
    dataset = trainer.train_dataset
    assert len(dataset) == 32 and trainer.args.per_device_train_batch_size == plan.micro_batch

    # TRL's own KL columns: row i's KL completion is the previous row's of its micro-batch (verified inside), and
    # no KL completion comes from a row of the same prompt (prompt token ids compared)
    assert kl_pairs_sharing_prompt(dataset, plan.micro_batch) == 0

    # as the dataloader forms the micro-batches: in dataset order, each row's KL sequence is its own prompt with the
    # previous row's completion, from another prompt
    batches = micro_batches(trainer)
    assert [len(batch) for batch in batches] == [plan.micro_batch] * (32 // plan.micro_batch)
    assert [row["prompt"] for batch in batches for row in batch] == [tuple(ids) for ids in dataset["prompt_ids"]]
    for batch in batches:
        for row, previous in zip(batch, batch[-1:] + batch[:-1]):
            assert row["KL_prompt"] == row["prompt"] and row["KL_completion"] == previous["completion"]
            assert previous["prompt"] != row["prompt"]
        if data != "binary":  # pairs: no prompt twice when a step has two micro-batches, else each pair's two rows
            prompts = len(batch) if plan.gradient_accumulation > 1 else len(batch) // 2
            assert len({row["prompt"] for row in batch}) == prompts

    # the same rows in each optimizer step as the plan's view: the same steps over the same pairs
    step_rows = plan.micro_batch * plan.gradient_accumulation
    ordered = kl_batch_order(plan.rows, micro_batch=plan.micro_batch, step_rows=step_rows)
    content = lambda row: (prompt_key(row), row["completion"], row["label"])  # noqa: E731
    for start in range(0, len(plan.rows), step_rows):
        assert Counter(map(content, ordered[start:start + step_rows])) == \
            Counter(map(content, plan.rows[start:start + step_rows]))

    # the test can fail: the unpaired view in its own order (chosen, rejected of each pair side by side)
    monkeypatch.setattr(kto, "kl_batch_order", lambda rows, **_: rows)
    monkeypatch.setattr(kto, "seeded_pair_order", lambda rows, seed: rows)
    unordered = KTO().trainer(job).train_dataset
    assert kl_pairs_sharing_prompt(unordered, plan.micro_batch) == before


def sharing(prompts: list, micro_batch: int) -> int:
    """KL pairs whose completion comes from a row of the same prompt, rows in ``prompts`` order."""
    return sum(prompts[row] == prompts[source] for row, source in enumerate(kl_sources(len(prompts), micro_batch)))


def test_kl_sources_rotate_each_micro_batch_by_one():
    assert kl_sources(10, 4) == [3, 0, 1, 2, 7, 4, 5, 6, 9, 8]  # the last micro-batch holds 2 rows


def test_kl_batch_order_is_as_good_as_any_order_of_the_step():
    """On random small steps (prompts repeating at random), ``kl_batch_order`` leaves no more KL pairs sharing a
    prompt than the best of all orders of the step's rows, and keeps each step's rows."""
    generator = random.Random(0)
    for _ in range(300):
        size, micro_batch = generator.randint(2, 7), generator.choice([2, 3, 4])
        prompts = [generator.randrange(generator.randint(1, size)) for _ in range(size)]
        rows = [{"prompt": [{"role": "user", "content": str(prompt)}], "completion": str(index), "label": True}
                for index, prompt in enumerate(prompts)]
        ordered = kl_batch_order(rows, micro_batch=micro_batch, step_rows=size)
        assert sorted(row["completion"] for row in ordered) == sorted(row["completion"] for row in rows)
        best = min(sharing(order, micro_batch) for order in set(itertools.permutations(prompts)))
        assert sharing([int(row["prompt"][0]["content"]) for row in ordered], micro_batch) == best, prompts


def test_a_last_step_of_one_pair_is_the_one_unavoidable_case():
    pairs = [{"prompt": [{"role": "user", "content": f"q{index}"}], "completion": side, "label": side == "yes"}
             for index in range(5) for side in ("yes", "no")]
    ordered = kl_batch_order(pairs, micro_batch=4, step_rows=8)  # steps of 4 pairs, then 1 pair
    assert sharing([prompt_key(row) for row in ordered], 4) == 2  # only the last step's two rows
    assert sharing([prompt_key(row) for row in pairs], 4) == 6    # the view's own order: one in two


def test_kto_fast_scoring_gives_trls_loss_and_gradients(tmp_path, tiny_model):
    """``HarnessKTOTrainer`` scores its policy, KL and reference forwards through the compact LM head and whole logits
    (harness.train.trl_extensions): on one micro-batch in fp32 the KTO loss and every gradient equal TRL's own path's
    up to float rounding."""
    from harness.train.trl_extensions import HarnessKTOTrainer

    job = kto_job(tmp_path, tiny_model, train_rows("toy-preference"), SMOKE_SHAPE)
    results = []
    for fast in (False, True):
        trainer = KTO().trainer(job)
        assert isinstance(trainer, HarnessKTOTrainer)
        trainer.compact_lm_head = trainer.whole_logit_scoring = fast
        results.append(one_micro_batch_step(trainer))
    assert_same_loss_and_gradients(*results)


def seeded_kto_jobs(tmp_path, model) -> dict[int, TrainingJob]:
    """KTO jobs of seeds 0 and 1 on the toy pairs in budget=smoke's shape (two steps of 8 pairs), as the sweep makes
    them: the seed in the budget and the job."""
    rows = train_rows("toy-preference")
    return {seed: dataclasses.replace(kto_job(tmp_path / str(seed), model, rows,
                                              dataclasses.replace(SMOKE_SHAPE, seed=seed)), seed=seed)
            for seed in (0, 1)}


def test_the_seed_orders_the_pairs_and_the_kl_guarantee_holds(tmp_path, tiny_model):
    """TRL trains KTO's rows in dataset order (a sequential sampler), so the adapter draws the order of the pairs from
    the run's seed (``seeded_pair_order``): two seeds give two orders of the same rows, with different steps; every
    step still holds whole pairs and no KL pair shares a prompt."""
    jobs = seeded_kto_jobs(tmp_path, tiny_model)
    trainers = {seed: KTO().trainer(job) for seed, job in jobs.items()}
    assert all(trainer.args.train_sampling_strategy == "sequential" for trainer in trainers.values())
    orders = {seed: list(zip(map(tuple, trainer.train_dataset["prompt_ids"]),
                             map(tuple, trainer.train_dataset["completion_ids"])))
              for seed, trainer in trainers.items()}
    assert orders[0] != orders[1] and Counter(orders[0]) == Counter(orders[1])

    plan = jobs[0].plan
    step_rows = plan.micro_batch * plan.gradient_accumulation
    steps = {}
    for seed, trainer in trainers.items():
        assert kl_pairs_sharing_prompt(trainer.train_dataset, plan.micro_batch) == 0
        cut = [orders[seed][start:start + step_rows] for start in range(0, len(orders[seed]), step_rows)]
        assert all(set(Counter(prompt for prompt, _ in step).values()) == {2} for step in cut)  # whole pairs
        steps[seed] = [frozenset(step) for step in cut]
    assert steps[0] != steps[1]  # the steps' contents differ, not only the order within a step


@pytest.mark.slow
def test_two_seeds_train_two_kto_models_and_one_seed_the_same(tmp_path, tiny_model):
    """Two optimizer steps on the toy pairs: seeds 0 and 1 give different weights, seed 0 twice the same weights."""
    import torch

    jobs = seeded_kto_jobs(tmp_path, tiny_model)
    trained = []
    for seed in (0, 1, 0):
        trainer = KTO(learning_rate=1e-3).trainer(jobs[seed])
        trainer.train()
        trained.append({name: value.detach().clone() for name, value in trainer.model.named_parameters()})
    first, other, again = trained
    assert any(not torch.equal(first[name], other[name]) for name in first)
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0, msg=name)


def test_seeded_pair_order_shuffles_whole_pairs():
    rows = [{"pair": index // 2, "side": index % 2} for index in range(10)]
    orders = {seed: kto.seeded_pair_order(rows, seed) for seed in range(3)}
    assert orders[0] == kto.seeded_pair_order(rows, 0) and len({str(order) for order in orders.values()}) == 3
    for order in orders.values():
        assert sorted(order, key=lambda row: (row["pair"], row["side"])) == rows
        assert all(order[i]["pair"] == order[i + 1]["pair"] and (order[i]["side"], order[i + 1]["side"]) == (0, 1)
                   for i in range(0, len(order), 2))
