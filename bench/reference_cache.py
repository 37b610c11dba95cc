"""What the shared reference log-prob cache saves: three reference-based methods on the same pairs,
each trained with the cache cold and warm, side by side in one run.

    python bench/reference_cache.py                      # tiny-random, 16 HH pairs: ~1 min on 2 idle cores
    python bench/reference_cache.py --model ~/.cache/alignment-harness/models/smollm2-135m-instruct \
        --pairs 64 --max-prompt-tokens 96 --max-completion-tokens 64

The tiny random Llama is 2 layers × 64 wide but keeps SmolLM2's 49,152-token vocabulary, so on CPU
its cost is the LM head: about 1 s per forward of 8 sequences of 200 tokens on 2 cores. The
defaults are sized for that; the ratios grow with the model, since the reference pass is a whole
forward over every pair while a hit reads a few bytes per pair.

Methods: ``dpo`` (TRL's sigmoid loss), ``ipo`` (the same DPO adapter with ``loss_type=ipo``) and
``rdpo`` (the harness's own loss through ``HarnessDPOTrainer``) — three different losses, one
reference. *Cold*: the method gets an empty cache folder, so it scores the reference itself (what
every run paid before the cache). *Warm*: it gets the folder the first cold run filled, so it reads
the reference log-probs another method scored. The runs alternate cold/warm per method so that
load from other processes on the machine hits both alike.

Columns: ``reference s`` = seconds obtaining reference log-probs (scoring on a miss, reading the
file on a hit; ``HarnessDPOTrainer.reference_seconds``); ``train s`` = the whole ``method.train``
call (model load, tokenization, reference, optimizer steps, save); ``reference tokens`` = what the
run reports to the budget (0 on a hit). With ``--repeats N`` each cell is the minimum over N runs
(each cold run with a fresh folder): on a machine shared with other work ``train s`` of a single
run moves by several seconds, while ``reference s`` is large on a miss and ~0 on a hit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="local HF model folder (reference and policy start); default: the tiny random Llama")
    parser.add_argument("--pairs", type=int, default=16, help="training pairs (HH harmless, the sweep's train split)")
    parser.add_argument("--batch-pairs", type=int, default=8, help="effective batch in pairs")
    parser.add_argument("--micro-batch-pairs", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--max-prompt-tokens", type=int, default=48)
    parser.add_argument("--max-completion-tokens", type=int, default=32)
    parser.add_argument("--data-mirror", type=Path,
                        default=Path(os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--repeats", type=int, default=1, help="runs per (method, cold/warm); the table shows the minimum")
    return parser.parse_args()


def main() -> None:
    arguments = parse_args()
    logging.disable(logging.WARNING)
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from harness.train.budget import Budget
    from harness.inputs.data import load_preference_rows, split_rows
    from harness.inputs.models import materialize_tiny_random
    from harness.inputs.paths import default_cache_dir
    from harness.protocols import TrainingJob
    from harness.train.plan import plan_training
    from methods.dpo import DPO
    from methods.rdpo import RDPO

    import harness.train.trl_extensions  # noqa: F401  TRL's import (seconds) is paid here, not by the first timed run
    hf_logging.set_verbosity_error()
    model = arguments.model.expanduser() if arguments.model else materialize_tiny_random(3, default_cache_dir())
    data_cfg = OmegaConf.load(REPO / "conf" / "data" / "hh-harmless.yaml")
    rows, _ = load_preference_rows(data_cfg, arguments.data_mirror)
    train_rows, _ = split_rows(rows, heldout=data_cfg.heldout_pairs, seed=data_cfg.split_seed)
    budget = Budget.from_config(OmegaConf.merge(OmegaConf.load(REPO / "conf" / "budget" / "smoke.yaml"), {
        "name": "bench", "pairs": arguments.pairs, "batch_pairs": arguments.batch_pairs,
        "micro_batch_pairs": arguments.micro_batch_pairs, "max_prompt_tokens": arguments.max_prompt_tokens,
        "max_completion_tokens": arguments.max_completion_tokens}))
    methods = [DPO(), DPO(name="ipo", loss_type="ipo", beta=0.01), RDPO()]
    plan = plan_training(budget, methods[0], train_rows, [], AutoTokenizer.from_pretrained(model))  # every method: pairs
    pairs = plan.rows
    print(f"model {model} · {len(pairs)} pairs · batch {budget.batch_pairs} · "
          f"{budget.max_prompt_tokens}+{budget.max_completion_tokens} tokens", flush=True)

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-reference-cache-") as scratch:
        scratch = Path(scratch)
        warm_store = scratch / f"cache-cold-{methods[0].name}-1"  # filled by the first cold run, read by every warm one
        for repeat in range(1, arguments.repeats + 1):
            for method in methods:
                for state in ("cold", "warm"):
                    store = scratch / f"cache-cold-{method.name}-{repeat}" if state == "cold" else warm_store
                    run = scratch / f"{method.name}-{state}-{repeat}"
                    job = TrainingJob(start_checkpoint=model, output_dir=run / "out", plan=plan, seed=budget.seed,
                                      scratch_dir=run / "scratch", reference_cache_dir=store)
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        outcome = method.train(job)
                    seconds = time.perf_counter() - started
                    runs.append((method.name, state, outcome.extra["reference_cache"],
                                 outcome.extra["reference_seconds"], seconds, outcome.reference_tokens))
                    print(f"  [{repeat}] {method.name:5s} {state}: {outcome.extra['reference_cache']}, "
                          f"reference {outcome.extra['reference_seconds']:.2f} s, train {seconds:.2f} s", flush=True)
    results = []
    for name in [m.name for m in methods]:
        for state in ("cold", "warm"):
            mine = [r for r in runs if r[0] == name and r[1] == state]
            statuses = "/".join(sorted({r[2] for r in mine}))
            results.append((name, state, statuses, min(r[3] for r in mine), min(r[4] for r in mine), mine[0][5]))

    print()
    print("| method | cache | status | reference s | train s | reference tokens |")
    print("|---|---|---|---:|---:|---:|")
    for name, state, status, reference, total, tokens in results:
        print(f"| {name} | {state} | {status} | {reference:.3f} | {total:.2f} | {tokens} |")
    print()
    print("| method | reference s cold/warm | train s cold/warm | train s saved |")
    print("|---|---:|---:|---:|")
    for name in [m.name for m in methods]:
        cold = next(r for r in results if r[0] == name and r[1] == "cold")
        warm = next(r for r in results if r[0] == name and r[1] == "warm")
        print(f"| {name} | {cold[3] / max(warm[3], 1e-6):.1f}× | {cold[4] / warm[4]:.2f}× | {cold[4] - warm[4]:.2f} |")


if __name__ == "__main__":
    main()
