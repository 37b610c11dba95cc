"""Speed of the scoring, generation and training paths: the old path and the new one on the same inputs, side by
side in one run, on the embedded model (or ``--model``). Run it on an idle machine:

    python bench/speed.py                                   # TruthfulQA 817 questions, GSM8K 32, toxicity, win rate, DPO
    python bench/speed.py --truthfulqa-limit 48 --gsm8k-limit 8   # a quicker look (the ratios, on fewer items)

It runs, in this order,

* ``bench/loglik_speed.py``: TruthfulQA MC1 + MC2 through lm-eval's stock HF backend (old) and the harness's
  prefix-cached engine (new): time, metrics, the largest per-choice log-likelihood difference;
* ``bench/generation_speed.py``: GSM8K (chat route), the toxicity task's and the win-rate task's generations through
  lm-eval's HF ``generate_until`` (old) and the harness's generation engine (new): time, share of identical outputs,
  metrics with standard errors;
* ``bench/train_speed.py``: this machine's bf16 and fp32 matmul peaks, then smoke DPO steps in fp32 on the previous
  code path (old) and with the budget's precision (new): achieved FLOP/s and its share of the bf16 peak;

and ends with one line:

    loglik_speedup=<x> generation_speedup=<y> max_loglik_diff=<d> generation_identical=<share> train_peak_share=<p>

Tests never assert these times; ``tests/`` checks the numbers the engines produce.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--truthfulqa-limit", type=int, default=817, help="TruthfulQA questions (default: all 817)")
    parser.add_argument("--gsm8k-limit", type=int, default=32, help="GSM8K test questions (default 32)")
    parser.add_argument("--train-steps", type=int, default=4, help="timed smoke DPO steps per path (after a warm-up)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loglik", "generation", "train"],
                        help="parts not to run (their fields print as n/a)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    print(f"bench/speed.py: load average {load:.2f} at the start (run on an idle machine)", flush=True)
    results: dict[str, dict] = {}
    began = time.perf_counter()
    if "loglik" not in args.skip:
        import loglik_speed

        results["loglik"] = loglik_speed.run(limit=args.truthfulqa_limit, model=args.model)
    if "generation" not in args.skip:
        import generation_speed

        results["generation"] = generation_speed.run(gsm8k_limit=args.gsm8k_limit, model=args.model)
    if "train" not in args.skip:
        import train_speed

        results["train"] = train_speed.run(steps=args.train_steps, model=args.model)
    results["wall_seconds"] = {"total": time.perf_counter() - began}
    results["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(summary_line(results), flush=True)
    return 0


def summary_line(results: dict) -> str:
    """The one line the issue asks for; a part that did not run prints n/a."""
    def field(part: str, key: str, fmt: str) -> str:
        value = results.get(part, {}).get(key)
        return "n/a" if value is None else format(value, fmt)

    return (f"loglik_speedup={field('loglik', 'speedup', '.2f')} "
            f"generation_speedup={field('generation', 'speedup', '.2f')} "
            f"max_loglik_diff={field('loglik', 'max_loglik_diff', '.2e')} "
            f"generation_identical={field('generation', 'identical_share', '.3f')} "
            f"train_peak_share={field('train', 'train_peak_share', '.3f')}")


if __name__ == "__main__":
    raise SystemExit(main())
