"""The generation engine against the generation it replaced, side by side in one run on the same inputs.

    python bench/generation_speed.py                          # embedded SmolLM2-135M-Instruct, GSM8K limit 32
    python bench/generation_speed.py --gsm8k-limit 4 --toxicity-per-group 1 --win-rate-limit 4   # a quick look
    python bench/generation_speed.py --model <HF folder> --threads 1

Three workloads, each run through the harness's real task (``evaluate``) twice — old path, then new —
with only the generation call swapped and timed (model loading, data, scoring and judging are not):

* **gsm8k** (``tasks/gsm8k.py`` at ``--gsm8k-limit`` questions, its lm-eval config, the instruct
  setting's chat route with few-shot as multi-turn): old = lm-eval's ``HFLM.generate_until``, new =
  ``harness.evaluate.generation.generate_until`` on the same ``HFLM``;
* **toxicity** (``tasks/toxicity.py`` defaults: 2 prompts per file, 32 new tokens, chat template) and
* **win_rate** (``tasks/win_rate.py`` defaults: 16 AlpacaEval instructions, 64 new tokens, greedy; judged
  against text-davinci-003 so that there is a metric): old = the harness's previous
  ``generate`` (``model.generate`` on length-sorted batches, kept as ``generation.generate_static`` and called through ``batched_hf_generate``),
  new = ``harness.evaluate.generation.generate``.

Both paths get the same ``--batch-size`` (the sweep's ``eval_batch_size``, 8). An item whose text differs is
explained: the first token where the two generations part and the model's logit gap between the two tokens
at that point (a near-tie argmax flip from a different float summation order shows a gap of ~1e-5).
Other jobs on the machine slow both paths alike only if they are steady; the load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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

CACHE = Path(os.environ.get("ALIGN_HARNESS_CACHE", "~/.cache/alignment-harness")).expanduser()
DATA = Path(os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data"))


def batched_hf_generate(model, tokenizer, prompts: list[str], *, threads: int | None = None, **options) -> list[str]:
    """The harness's ``generate`` before the engine (commit ead2b5f): ``generation.generate_static``, which keeps it
    (``engine=hf``); ``threads`` is accepted and unused, as the old signature had none."""
    from harness.evaluate.generation import generate_static

    return generate_static(model, tokenizer, prompts, **options)


class Timer:
    def __init__(self):
        self.seconds, self.engine_stats = 0.0, []

    def wrap(self, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


@contextlib.contextmanager
def generation_path(path: str, timer: Timer):
    """Swap the harness's generation (``generate`` and lm-eval's ``HFLM.generate_until``) for the old or new one."""
    from lm_eval.models.huggingface import HFLM

    from harness.evaluate import continuous_batching, generation
    from harness.evaluate.lm_backend import HarnessLM

    saved = generation.generate, HFLM.generate_until
    harness_until = HarnessLM.generate_until  # the tasks' lm-eval model: its own generate_until is the engine's
    engine_run = continuous_batching.run

    def run_with_stats(*args, **kwargs):
        kwargs["stats"] = {}
        try:
            return engine_run(*args, **kwargs)
        finally:
            timer.engine_stats.append(kwargs["stats"])

    continuous_batching.run = run_with_stats
    if path == "old":
        generation.generate = timer.wrap(batched_hf_generate)
        HFLM.generate_until = HarnessLM.generate_until = timer.wrap(saved[1])
    else:
        generation.generate = timer.wrap(saved[0])
        HFLM.generate_until = HarnessLM.generate_until = timer.wrap(
            lambda lm, requests, disable_tqdm=False: generation.generate_until(lm, requests, disable_tqdm))
    try:
        yield
    finally:
        generation.generate, HFLM.generate_until = saved
        HarnessLM.generate_until = harness_until
        continuous_batching.run = engine_run


def run(gsm8k_limit: int = 32, model: str | Path | None = None, *, toxicity_per_group: int = 2,
        win_rate_limit: int = 16, batch_size: int = 8, threads: int | None = None, old_threads: int | None = None,
        tasks: tuple[str, ...] = ("gsm8k", "toxicity", "win_rate")) -> dict:
    """Time old vs new generation on the three workloads; compare texts and metrics; print and return a summary.

    ``threads`` fixes the engine's torch threads (default: its load-aware choice); ``old_threads`` the old path's
    (default: torch's, as the harness ran before the engine).
    """
    import torch

    from harness.inputs.models import materialize_embedded
    from harness.protocols import Checkpoint, TaskContext
    from tasks.gsm8k import GSM8K
    from tasks.toxicity import Toxicity
    from tasks.win_rate import WinRate

    if threads is not None:
        from harness.evaluate import continuous_batching

        policy = continuous_batching.ThreadPolicy
        continuous_batching.ThreadPolicy = lambda requested: policy(threads if requested is None else requested)
    path = Path(model) if model else materialize_embedded("smollm2-135m-instruct", CACHE)
    checkpoint = Checkpoint(path=path, setting="instruct", use_chat_template=True)
    workloads = {
        "gsm8k": (GSM8K(limit=gsm8k_limit), "generation", "doc_id"),
        "toxicity": (Toxicity(per_group=toxicity_per_group), "generation", None),
        "win_rate": (WinRate(limit=win_rate_limit, reference="davinci003"), "output", "item_id"),
    }
    workloads = {name: workloads[name] for name in tasks}
    summary = {"model": str(path), "batch_size": batch_size, "threads": threads or "auto",
               "old_threads": old_threads or torch.get_num_threads(), "load_average_before": os.getloadavg(),
               "old_seconds": 0.0, "new_seconds": 0.0, "items": 0, "identical": 0, "not_identical": [],
               "per_task": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (task, text_key, id_key) in workloads.items():
            results, seconds = {}, {}
            for which in ("old", "new"):
                timer = Timer()
                # win_rate caches its outputs by checkpoint: each path gets its own folder; the others share one
                folder = Path(scratch) / (f"{name}-{which}" if name == "win_rate" else name)
                context = TaskContext(data_mirror=DATA, cache_dir=folder, device="cpu",
                                      batch_size=batch_size, show_progress=False, cache_root=CACHE)
                default_threads = torch.get_num_threads()
                if which == "old" and old_threads:
                    torch.set_num_threads(old_threads)
                try:
                    with generation_path(which, timer), contextlib.redirect_stderr(open(os.devnull, "w")):
                        results[which] = task.evaluate(checkpoint, context)
                finally:
                    torch.set_num_threads(default_threads)
                if timer.seconds == 0.0:  # the swap missed the generation the task ran: its numbers would be lies
                    raise RuntimeError(f"{name}: the {which} path's generation was not timed; "
                                       "generation_path() did not reach the task's generation call")
                seconds[which] = timer.seconds
                if which == "new":
                    engine_stats = timer.engine_stats
                print(f"{name}: {which} generation {timer.seconds:.1f} s", flush=True)
            old_samples, new_samples = results["old"].samples, results["new"].samples
            prompts = [model_input(path, name, s) for s in old_samples]
            differing = [k for k, (a, b) in enumerate(zip(old_samples, new_samples)) if a[text_key] != b[text_key]]
            for k in differing:
                summary["not_identical"].append({
                    "task": name, "item": old_samples[k].get(id_key, k) if id_key else k,
                    "why": explain_difference(path, name, prompts[k], old_samples[k][text_key], new_samples[k][text_key])})
            metrics = {}
            for metric, old in results["old"].metrics.items():
                new = results["new"].metrics[metric]
                metrics[metric] = {"old": old.value, "new": new.value, "stderr_old": old.stderr, "stderr_new": new.stderr,
                                   "within_stderr": within_stderr(old, new)}
            summary["per_task"][name] = {"old_seconds": round(seconds["old"], 1), "new_seconds": round(seconds["new"], 1),
                                         "speedup": round(seconds["old"] / max(seconds["new"], 1e-9), 2),
                                         "items": len(old_samples), "identical": len(old_samples) - len(differing),
                                         "engine": engine_stats,
                                         "metrics": metrics}
            summary["old_seconds"] += seconds["old"]
            summary["new_seconds"] += seconds["new"]
            summary["items"] += len(old_samples)
            summary["identical"] += len(old_samples) - len(differing)
            if name == "gsm8k":
                for suffix in ("strict", "flexible"):
                    metric = f"exact_match_{suffix}"
                    summary[f"gsm8k_old_{suffix}"] = [results["old"].metrics[metric].value, results["old"].metrics[metric].stderr]
                    summary[f"gsm8k_new_{suffix}"] = [results["new"].metrics[metric].value, results["new"].metrics[metric].stderr]
                summary["gsm8k_old"] = summary["gsm8k_old_flexible"][0]
                summary["gsm8k_new"] = summary["gsm8k_new_flexible"][0]
    summary["old_seconds"] = round(summary["old_seconds"], 1)
    summary["new_seconds"] = round(summary["new_seconds"], 1)
    summary["speedup"] = round(summary["old_seconds"] / max(summary["new_seconds"], 1e-9), 2)
    summary["identical_share"] = round(summary["identical"] / max(summary["items"], 1), 4)
    summary["metrics_within_stderr"] = all(m["within_stderr"] for t in summary["per_task"].values()
                                           for m in t["metrics"].values())
    summary["load_average_after"] = os.getloadavg()
    print(json.dumps(summary, indent=1, default=str))
    return summary


def model_input(path: Path, task: str, sample: dict) -> str:
    """The text the model continued for one item (the task's prompt with its chat template)."""
    from harness.evaluate.generation import format_prompt

    if task == "gsm8k":
        return sample["prompt"]
    if task == "toxicity":
        return sample["model_input"]
    return format_prompt(_loaded(path)[1], [{"role": "user", "content": sample["instruction"]}], True)


def within_stderr(old, new) -> bool:
    """|old − new| within the larger of the two standard errors (a zero or missing one: exact equality)."""
    errors = [e for e in (old.stderr, new.stderr) if e is not None and not math.isnan(e)]
    bound = max(errors) if errors else 0.0
    return abs(old.value - new.value) <= bound + 1e-12


def explain_difference(path: Path, task: str, prompt: str | None, old: str, new: str) -> str:
    """Where two generations of one prompt part, and the model's logit gap between the two tokens there."""
    import torch

    cut = next((k for k, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    where = f"texts part at char {cut}: old {old[cut: cut + 20]!r} vs new {new[cut: cut + 20]!r}"
    if prompt is None:
        return where
    model, tokenizer = _loaded(path)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    old_ids = tokenizer(old, add_special_tokens=False)["input_ids"]
    new_ids = tokenizer(new, add_special_tokens=False)["input_ids"]
    step = next((k for k, (a, b) in enumerate(zip(old_ids, new_ids)) if a != b), None)
    if step is None:  # one is a prefix of the other: one stopped (EOS / stop string / length) where the other went on
        return where + "; one text is a prefix of the other (a stop at different points)"
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + old_ids[:step]])).logits[0, -1].float()
    gap = float(logits[old_ids[step]] - logits[new_ids[step]])
    top = logits.topk(2).values
    return (where + f"; first different token #{step}: old {tokenizer.decode([old_ids[step]])!r} vs new "
            f"{tokenizer.decode([new_ids[step]])!r}, logit gap old−new {gap:.2e} (top-2 gap {float(top[0] - top[1]):.2e})")


_MODELS: dict = {}


def _loaded(path: Path):
    from harness.evaluate.generation import load_for_generation

    if path not in _MODELS:
        _MODELS[path] = load_for_generation(path)
    return _MODELS[path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gsm8k-limit", type=int, default=32)
    parser.add_argument("--toxicity-per-group", type=int, default=2)
    parser.add_argument("--win-rate-limit", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="both paths' batch size (the sweep's eval_batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="the engine's torch threads (default: automatic)")
    parser.add_argument("--old-threads", type=int, default=None, help="the old path's torch threads (default: torch's)")
    parser.add_argument("--tasks", default="gsm8k,toxicity,win_rate", help="comma-separated subset of the workloads")
    parser.add_argument("--model", type=Path, default=None, help="HF folder; default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    run(args.gsm8k_limit, args.model, toxicity_per_group=args.toxicity_per_group, win_rate_limit=args.win_rate_limit,
        batch_size=args.batch_size, threads=args.threads, old_threads=args.old_threads,
        tasks=tuple(args.tasks.split(",")))


if __name__ == "__main__":
    main()
