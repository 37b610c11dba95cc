"""Training-step speed and memory by precision (fp32 vs bf16), measured side by side in one run.

    python bench/precision.py                      # the embedded SmolLM2-135M, 2 DPO steps each
    python bench/precision.py --model /path --steps 4 --pairs 8

Runs the harness's own DPO adapter on the same pairs under budgets that differ only in
``precision`` and prints wall seconds, peak memory and the ratios. Needs ALIGN_HARNESS_DATA (or
``--data``) pointing at the data mirror.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--data", default=os.environ.get("ALIGN_HARNESS_DATA"), help="data mirror folder")
    arguments = parser.parse_args()

    from transformers import AutoTokenizer

    from harness.train.budget import Budget, ResourceMeter
    from harness.inputs.data import load_preference_rows, split_rows
    from harness.inputs.models import materialize_embedded
    from harness.inputs.paths import default_cache_dir
    from harness.protocols import TrainingJob
    from harness.run.registry import CONF_DIR, instantiate
    from harness.train.plan import plan_training

    model = Path(arguments.model) if arguments.model else materialize_embedded("smollm2-135m-instruct", default_cache_dir())
    data_cfg = OmegaConf.load(CONF_DIR / "data" / "hh-harmless.yaml")
    rows, _ = load_preference_rows(data_cfg, arguments.data)
    train, _ = split_rows(rows, heldout=data_cfg.heldout_pairs, seed=data_cfg.split_seed)
    base = Budget.from_config(OmegaConf.load(CONF_DIR / "budget" / "smoke.yaml"))
    base = replace(base, pairs=arguments.pairs, batch_pairs=arguments.batch, micro_batch_pairs=arguments.batch)
    tokenizer = AutoTokenizer.from_pretrained(model)
    results = {}
    for precision in ("fp32", "bf16"):
        method = instantiate("method", "dpo", None, params_key="method_params")
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-{precision}-"))
        plan = plan_training(replace(base, precision=precision), method, train, [], tokenizer)
        job = TrainingJob(start_checkpoint=model, output_dir=scratch / "out", plan=plan, seed=0,
                          scratch_dir=scratch / "scratch")
        with ResourceMeter() as meter:
            outcome = method.train(job)
        results[precision] = (meter.wall_seconds / max(outcome.optimizer_steps, 1), meter.peak_memory_mib,
                              outcome.optimizer_steps)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nDPO on {model.name}: {arguments.pairs} pairs, {arguments.batch} pairs per step")
    print(f"{'precision':<10} {'s/step':>8} {'peak MiB':>9} {'steps':>6}")
    for precision, (seconds, memory, steps) in results.items():
        print(f"{precision:<10} {seconds:>8.2f} {memory:>9.0f} {steps:>6}")
    fp32, bf16 = results["fp32"], results["bf16"]
    print(f"bf16 / fp32: time {bf16[0] / fp32[0]:.2f}×, peak memory {bf16[1] / fp32[1]:.2f}×")


if __name__ == "__main__":
    main()
