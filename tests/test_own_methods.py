"""The own-loss methods (rdpo, dpop, beta_dpo, npo, sdpo) train for real on ``tiny-random``: through
the real CLI, one step-by-step check that every parameter moves, and the shared reference cache.
About a minute and a half on 2 CPU cores."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import cache_entries, run_cli
from harness.run import registry
from harness.train.budget import Budget
from harness.protocols import TrainingJob
from harness.records import read_records
from harness.train.plan import plan_training

OWN = ["rdpo", "dpop", "beta_dpo", "npo", "sdpo"]
REPO = Path(__file__).resolve().parent.parent

ROWS = [{"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
         "chosen": f"It is {2 * i}.",
         "rejected": f"Maybe {2 * i + 1}, or something else; I would not like to say for sure."} for i in range(4)]


def budget(**changes) -> Budget:
    """``budget=micro`` with two optimizer steps of two pairs (so sdpo has two chunks to step through)."""
    return Budget.from_config(OmegaConf.merge(OmegaConf.load(REPO / "conf/budget/micro.yaml"),
                                              {"batch_pairs": 2, **changes}))


PAIR_METHOD = SimpleNamespace(data_view="pairs")  # what the plan reads of every own-loss method: it trains on pairs


def job_for(start: Path, folder: Path, reference_cache: Path, **budget_changes) -> TrainingJob:
    from transformers import AutoTokenizer

    plan = plan_training(budget(**budget_changes), PAIR_METHOD, ROWS, [], AutoTokenizer.from_pretrained(start))
    return TrainingJob(start_checkpoint=start, output_dir=folder / "out", plan=plan, seed=0,
                       scratch_dir=folder / "scratch", reference_cache_dir=reference_cache)


def test_own_methods_train_through_the_cli_and_share_the_reference_cache(tmp_path, cache_dir):
    result = run_cli("sweep", "model=tiny-random", "budget=micro", "budget@stage_budget=micro",
                     "budget.batch_pairs=2",  # two optimizer steps, so sdpo has two chunks
                     "settings=[instruct]", f"methods=[dpo,{','.join(OWN)}]", "include_start=false",
                     "tasks=[truthfulqa_mc]", "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4",
                     f"paths.results={tmp_path}", "name=own", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["method"]: r for r in read_records(tmp_path / "own")}
    assert set(records) == {"dpo", *OWN}
    assert all(r["status"] == "ok" for r in records.values()), {m: r["reason"] for m, r in records.items()}
    for name, record in records.items():
        consumed = record["consumed"]
        # matched budget: DPO's optimizer steps over DPO's pairs, for every method
        assert consumed["optimizer_steps"] == 2 and consumed["pairs"] == 4, name
        assert consumed["policy_tokens"] > 0 and set(record["metrics"]) == {"mc1", "mc2"}, name
    # dpo ran first in the sweep and scored the starting checkpoint on these pairs (or found them scored by
    # an earlier test of this session); every later method with the same reference and pairs reads them
    assert records["dpo"]["consumed"]["reference_cache"] in ("hit", "miss")
    for name in ("rdpo", "dpop", "beta_dpo", "npo"):
        assert records[name]["consumed"]["reference_cache"] == "hit", name
        assert records[name]["consumed"]["reference_tokens_scored_here"] == 0, name
        # the method's own cost still counts the reference tokens it needed (order-independent FLOPs)
        assert records[name]["consumed"]["reference_tokens"] == records["dpo"]["consumed"]["reference_tokens"], name
    sdpo = records["sdpo"]["consumed"]
    assert sdpo["sdpo_chunks"] == 2 and sdpo["sdpo_chunk_pairs"] == [2, 2]
    # the second chunk's reference is the first chunk's policy: never cached before, so scored
    assert sdpo["reference_cache_chunks"][1] == "miss" and sdpo["reference_tokens"] > 0


@pytest.mark.parametrize("name", OWN)
def test_every_trainable_parameter_changes(name, tiny_model, tmp_path):
    method = registry.instantiate("method", name, OmegaConf.create({"learning_rate": 1e-3}), params_key="method_params")
    job = job_for(tiny_model, tmp_path, tmp_path / "reference")
    outcome = method.train(job)
    assert outcome.optimizer_steps == 2 and outcome.pairs == 4
    assert outcome.curves and all(torch.isfinite(torch.tensor(c["loss"])) for c in outcome.curves if "loss" in c)
    before, after = load_file(tiny_model / "model.safetensors"), load_file(job.output_dir / "model.safetensors")
    assert set(before) == set(after)
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    assert not unchanged, f"{name}: parameters that did not change: {unchanged}"


def test_reference_cache_hit_returns_the_stored_logprobs(tiny_model, tmp_path):
    from harness.train.trl_extensions import CACHE_COLUMNS
    from harness.train.pairwise import pairwise_trainer
    from methods.rdpo import rdpo_loss

    store = tmp_path / "reference"
    job = job_for(tiny_model, tmp_path, store)
    first = pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-6)  # TRL's own sigmoid loss
    second = pairwise_trainer(job, start=tiny_model, beta=0.1, learning_rate=1e-6,
                              pairwise_loss=partial(rdpo_loss, beta=0.1, alpha=0.01))
    assert first.reference_cache_status == {"train": "miss"}
    assert second.reference_cache_status == {"train": "hit"}
    for column in CACHE_COLUMNS:
        assert second.train_dataset[column] == first.train_dataset[column]  # identical, not merely close
    entries = cache_entries(store)  # without build_once's lock file and builds.jsonl
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"  # one entry, no leftover temporary file

    uncached = pairwise_trainer(job_for(tiny_model, tmp_path, None), start=tiny_model, beta=0.1, learning_rate=1e-6)
    assert uncached.reference_cache_status == {"train": "off"}
    for column in CACHE_COLUMNS:
        assert uncached.train_dataset[column] == pytest.approx(first.train_dataset[column], rel=1e-6, abs=1e-5)

    # other lengths are another key: a miss, and a second entry
    shorter = pairwise_trainer(job_for(tiny_model, tmp_path, store, max_completion_tokens=8), start=tiny_model,
                               beta=0.1, learning_rate=1e-6)
    assert shorter.reference_cache_status == {"train": "miss"} and len(cache_entries(store)) == 2


def test_cache_key_follows_reference_weights_tokens_and_lengths(tmp_path):
    from datasets import Dataset

    from harness.train.trl_extensions import reference_cache_key, reference_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    rows = Dataset.from_dict({"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]], "rejected_ids": [[7], [8]]})
    settings = {"max_length": 64, "dtype": "torch.float32"}
    identity = reference_identity(folder)
    key = reference_cache_key(identity, rows, settings)
    assert key == reference_cache_key(reference_identity(folder), rows, settings)  # deterministic

    changed_token = Dataset.from_dict({**rows.to_dict(), "rejected_ids": [[7], [9]]})
    assert reference_cache_key(identity, changed_token, settings) != key
    # tokens moved between prompt and completion change what is scored, not just the concatenation
    moved = Dataset.from_dict({"prompt_ids": [[1], [3]], "chosen_ids": [[2, 4], [5, 6]], "rejected_ids": [[2, 7], [8]]})
    assert reference_cache_key(identity, moved, settings) != key
    assert reference_cache_key(identity, rows, {**settings, "max_length": 32}) != key

    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten weights
    assert reference_cache_key(reference_identity(folder), rows, settings) != key
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    assert reference_identity(folder)["config_sha256"] != identity["config_sha256"]
    assert reference_identity(tmp_path / "no-such-model") is None  # hub ids and missing folders: no caching
