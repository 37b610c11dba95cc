"""Matched budgets, measured: every method trained under one ``budget.match`` in one sweep, and what each consumed
next to the target (what a DPO-like pair method consumes on the budget's pairs).

    python bench/matching.py                              # every method in conf/method, match=flops, tiny-random
    python bench/matching.py --match tokens --methods dpo,simpo,lipo,dro
    python bench/matching.py --model smollm2-135m --budget smoke --methods dpo,kto,simpo   # the embedded model

It runs the real CLI, ``align-harness sweep model=<model> budget=<budget> budget.match=<match>
methods=[...] tasks=[heldout_preference]`` (online methods get ``reward=short-answers``, a programmatic reward,
unless ``--reward`` names another), into a temporary folder, then reads the records and prints one row per
method: its data view, the pairs (or prompt / list visits) it trained on, optimizer steps, trained policy tokens,
forward-only reference tokens, generated tokens, FLOPs, the target, ``match_estimate`` (the matcher's pre-training
estimate / target) and ``match_ratio`` (consumed / target, the number the leaderboard shows). Under
``--match examples`` there is no token or FLOP target: every method trains on the same pairs, and the table shows
how far their costs then drift apart.

Offline methods match to about one pair visit (ratio within ~5 %; ``tests/test_matching_and_learning.py`` holds
it). Online methods price every sample at the length cap, so a policy that stops early consumes less than its
target and its ratio falls below 1 (``harness/train/matching.py`` explains the estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma list; default: every method in conf/method")
    parser.add_argument("--match", default="flops", choices=["examples", "tokens", "flops"])
    parser.add_argument("--model", default="tiny-random", help="conf/model/<name> (default tiny-random: seconds a run)")
    parser.add_argument("--budget", default="micro", help="conf/budget/<name>")
    parser.add_argument("--pairs", type=int, default=8, help="budget.pairs")
    parser.add_argument("--reward", default="short-answers", help="reward of the online methods (conf/reward/)")
    parser.add_argument("--results", type=Path, default=None, help="keep the sweep here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return parser.parse_args()


def every_method() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def run_sweep(arguments: argparse.Namespace, methods: list[str], results: Path) -> float:
    command = [sys.executable, "-m", "harness.cli", "sweep", f"model={arguments.model}", f"budget={arguments.budget}",
               f"budget@stage_budget={arguments.budget}", f"budget.pairs={arguments.pairs}",
               f"budget.match={arguments.match}", f"methods=[{','.join(methods)}]", "settings=[instruct]",
               "tasks=[heldout_preference]", "+task_params.heldout_preference.limit=4", f"reward={arguments.reward}",
               f"paths.results={results}", "name=matching"]
    print("$", " ".join(command[2:]), flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed with exit status {done.returncode}")
    return time.perf_counter() - began


def rows(results: Path) -> list[dict]:
    from harness.records import read_records

    out = {}
    for record in read_records(results / "matching"):
        if record["method"] == "start" or record["status"] != "ok":
            continue
        consumed = record.get("consumed") or {}
        out[record["method"]] = {
            "method": record["method"], "view": (record.get("run_config") or {}).get("data_view", ""),
            "pairs": consumed.get("pairs"), "steps": consumed.get("optimizer_steps"),
            "policy_tokens": consumed.get("policy_tokens"), "reference_tokens": consumed.get("reference_tokens"),
            "generation_tokens": consumed.get("generation_tokens"), "flops": consumed.get("flops"),
            "target": consumed.get("match_target"), "estimate": consumed.get("match_estimate"),
            "ratio": consumed.get("match_ratio"), "met": consumed.get("match_met")}
    return list(out.values())


def number(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e5:
        return str(int(value))
    if isinstance(value, float) and (abs(value) >= 1e5):
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main() -> None:
    arguments = parse_args()
    methods = arguments.methods.split(",") if arguments.methods else every_method()
    with tempfile.TemporaryDirectory() as scratch:
        results = arguments.results or Path(scratch)
        seconds = run_sweep(arguments, methods, results)
        table = rows(results)
    missing = sorted(set(methods) - {r["method"] for r in table})
    print(f"\nbudget.match={arguments.match}, model={arguments.model}, budget={arguments.budget}, "
          f"pairs={arguments.pairs}: {len(table)} methods in {seconds:.0f} s")
    columns = ["method", "pairs", "steps", "policy_tokens", "reference_tokens", "generation_tokens", "flops", "target",
               "estimate", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in sorted(table, key=lambda r: r["method"]):
        print("| " + " | ".join(number(row[c]) for c in columns) + " |")
    ratios = [r["ratio"] for r in table if r["ratio"] is not None]
    if ratios:
        print(f"match_ratio: min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} methods")
    if missing:
        print(f"not ok (see the sweep's records): {', '.join(missing)}")
    if arguments.json:
        arguments.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
