"""TruthfulQA MC1+MC2 scored by lm-eval's stock HFLM (old) and the harness's prefix-sharing engine (new), side by side.

    python bench/loglik_speed.py --limit 48          # the embedded SmolLM2-135M-Instruct, first 48 questions
    python bench/loglik_speed.py                     # all 817 questions (~25 min on the old path, 2 CPU cores)
    python bench/loglik_speed.py --chat --model /path/to/hf-folder
    python bench/loglik_speed.py --limit 48 --threads 1   # on a machine shared with other jobs

Both engines read the same task YAMLs (the harness's ``truthfulqa_mc``: lm-eval's stock configs on the mirror's
data), the same model folder and batch size, in one process. ``old_seconds`` / ``new_seconds`` time lm-eval's
``loglikelihood`` call (tokenization and scoring; model loading and task building are the same for both and are
reported apart as ``*_total_seconds``). Printed and returned: the times, ``speedup``, the largest per-choice
log-likelihood difference, whether the metrics agree (within ``METRIC_TOLERANCE``) and both engines' MC1 / MC2.
Needs ALIGN_HARNESS_DATA (or ``--data``) pointing at the data mirror.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRIC_TOLERANCE = 1e-6  # MC1 is a share of argmaxes (equal unless a tie flips); MC2 moves with exp(log-likelihood)


def run(limit: int = 817, chat: bool = False, model: str | Path | None = None, batch_size: int = 8,
        data: str | Path | None = None, threads: int | None = None) -> dict:
    """Score the first ``limit`` questions by both engines on the embedded model (or the folder ``model``), with
    ``threads`` torch threads (None: torch's default, one per core)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from harness.evaluate.task_support import evaluate_lm, make_lm
    from harness.inputs.models import materialize_embedded
    from harness.inputs.paths import default_cache_dir
    from tasks.truthfulqa_mc import read_mirror, write_data_file, write_task_configs

    data = Path(data or os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data"))
    model_path = Path(model) if model else materialize_embedded("smollm2-135m-instruct", default_cache_dir())
    rows = read_mirror(data / "truthfulqa" / "mc_task.json")[:limit]
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        data_file, _ = write_data_file(rows, Path(work))
        task_files = write_task_configs(data_file, 0, Path(work))
        for engine in ("hf", "harness"):
            lm = make_lm(model_path, device="cpu", batch_size=batch_size, engine=engine)
            scoring = _time_loglikelihood(lm)
            started = time.perf_counter()
            out = evaluate_lm(lm, task_files, chat=chat)
            runs[engine] = {"out": out, "scoring": scoring["seconds"], "total": time.perf_counter() - started,
                            "stats": getattr(lm, "last_stats", None)}
            del lm
    old, new = runs["hf"]["out"], runs["harness"]["out"]
    metrics = {f"{name}_{side}": float(out["results"][f"truthfulqa_{name}"]["acc,none"])
               for name in ("mc1", "mc2") for side, out in (("old", old), ("new", new))}
    metric_diff = max(abs(metrics[f"{name}_old"] - metrics[f"{name}_new"]) for name in ("mc1", "mc2"))
    return {
        "questions": len(rows),
        "old_seconds": runs["hf"]["scoring"],
        "new_seconds": runs["harness"]["scoring"],
        "speedup": runs["hf"]["scoring"] / runs["harness"]["scoring"],
        "max_loglik_diff": _max_loglik_diff(old, new),
        "metrics_identical": metric_diff <= METRIC_TOLERANCE,
        "max_metric_diff": metric_diff,
        **metrics,
        "old_total_seconds": runs["hf"]["total"],
        "new_total_seconds": runs["harness"]["total"],
        "engine_stats": runs["harness"]["stats"],
        "chat": chat,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "model": str(model_path),
    }


def _time_loglikelihood(lm) -> dict:
    """Wrap ``lm.loglikelihood`` (the one call lm-eval makes for all log-likelihood requests) with a timer."""
    timing = {"seconds": 0.0}
    inner = lm.loglikelihood

    def timed(requests, *args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            timing["seconds"] += time.perf_counter() - started

    lm.loglikelihood = timed
    return timing


def _max_loglik_diff(old: dict, new: dict) -> float:
    """Largest |difference| of a per-choice log-likelihood between the two runs (same documents, same choices)."""
    largest = 0.0
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        theirs = {sample["doc_id"]: sample for sample in old["samples"][task]}
        for sample in new["samples"][task]:
            reference = theirs[sample["doc_id"]]
            if sample["arguments"] != reference["arguments"]:
                raise AssertionError(f"{task} doc {sample['doc_id']}: the engines were given different requests")
            for (logp, _), (old_logp, _) in zip(sample["filtered_resps"], reference["filtered_resps"], strict=True):
                largest = max(largest, abs(float(logp) - float(old_logp)))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=817, help="first N questions (default: all 817)")
    parser.add_argument("--chat", action="store_true", help="prompt through the chat template (both engines)")
    parser.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of both engines (default 8)")
    parser.add_argument("--data", default=None, help="data mirror folder (default: ALIGN_HARNESS_DATA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per core; 1 on a machine shared with other jobs)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    arguments = parser.parse_args()
    result = run(arguments.limit, arguments.chat, arguments.model, arguments.batch_size, arguments.data,
                 arguments.threads)
    if arguments.json:
        print(json.dumps(result))
        return
    print(f"model {result['model']}  questions {result['questions']}  chat template {result['chat']}  "
          f"batch size {result['batch_size']}  torch threads {result['threads']}")
    print(f"{'':18} {'lm-eval HFLM':>14} {'harness engine':>15}")
    print(f"{'scoring seconds':18} {result['old_seconds']:14.1f} {result['new_seconds']:15.1f}   "
          f"speedup {result['speedup']:.1f}x")
    print(f"{'total seconds':18} {result['old_total_seconds']:14.1f} {result['new_total_seconds']:15.1f}")
    for name in ("mc1", "mc2"):
        print(f"{name:18} {result[name + '_old']:14.6f} {result[name + '_new']:15.6f}")
    print(f"max |per-choice log-likelihood difference| {result['max_loglik_diff']:.2e}; "
          f"metrics identical: {result['metrics_identical']} (max |difference| {result['max_metric_diff']:.1e})")
    print(f"engine: {result['engine_stats']}")


if __name__ == "__main__":
    main()
