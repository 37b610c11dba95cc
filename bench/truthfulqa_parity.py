"""TruthfulQA MC parity: the harness's ``truthfulqa_mc`` task against lm-eval's own registered
``truthfulqa_mc1`` / ``truthfulqa_mc2`` tasks, on the same checkpoint and the same questions,
side by side in one run.

    python bench/truthfulqa_parity.py                            # embedded SmolLM2-135M-Instruct, all 817 questions
    python bench/truthfulqa_parity.py --limit 24 --chat           # the default subset, through the chat template
    python bench/truthfulqa_parity.py --model /path/to/hf/model   # any local checkpoint

The two routes share nothing but lm-eval and the checkpoint: the reference route converts the
mirror's ``mc_task.json`` to the hub layout itself (``stock_rows``) and asks lm-eval for its
*registered* tasks through a group whose members override only the data source (lm-eval's own
override mechanism), while the harness writes task YAMLs that ``include`` the stock ones. Printed:
MC1 / MC2 and their standard errors by both routes, their largest absolute differences, and the
largest per-choice log-likelihood difference. ``tests/test_truthfulqa_mc.py`` asserts the same on
3 questions of a random tiny model (tolerance 1e-4).

Cost: each question is ~12.7 log-likelihood requests; SmolLM2-135M on 2 CPU cores takes ~2 s per
question per route, so the full set is ~25-30 min per route (both routes run).
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

from tasks.truthfulqa_mc import SUBTASKS  # noqa: E402


def stock_rows(mc_file: Path, limit: int | None) -> list[dict]:
    """The mirror's questions in the hub layout, converted independently of ``tasks.truthfulqa_mc``."""
    rows = []
    for row in json.loads(Path(mc_file).read_text())[:limit]:
        hub_row = {"question": row["question"]}
        for field in ("mc1_targets", "mc2_targets"):
            hub_row[field] = {"choices": list(row[field]), "labels": list(row[field].values())}
        rows.append(hub_row)
    return rows


def stock_scores(model_path: Path, rows: list[dict], chat: bool, work_dir: Path, batch_size: int = 4) -> dict:
    """lm-eval's registered truthfulqa_mc1/mc2 on ``rows``: {subtask: {value, stderr, loglikelihoods}}."""
    import lm_eval
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data_file = Path(work_dir) / f"truthfulqa_stock_{len(rows)}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    swap_data = {"dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": {"validation": str(data_file)}}}
    stock_dir = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(model_path), device="cpu", batch_size=batch_size, dtype="float32"),
        # A group whose members name the registered tasks with overrides: lm-eval's own override route.
        tasks=[{"group": "parity", "task": [{"task": name, **swap_data} for name in SUBTASKS]}],
        task_manager=TaskManager(include_defaults=False, include_path=stock_dir),
        apply_chat_template=chat,
        log_samples=True,
    )
    scores = {}
    for task_name, subtask in SUBTASKS.items():
        result = out["results"][task_name]
        scores[subtask] = {
            "value": float(result["acc,none"]),
            "stderr": float(result["acc_stderr,none"]),
            "loglikelihoods": {int(s["doc_id"]): [float(ll) for ll, _ in s["filtered_resps"]]
                               for s in out["samples"][task_name]},
        }
    return scores


def compare(ours, stock: dict) -> dict:
    """Largest absolute differences between our ``TaskResult`` and ``stock_scores``' output."""
    diffs = {"value": 0.0, "stderr": 0.0, "loglikelihood": 0.0, "samples": 0}
    for subtask, reference in stock.items():
        diffs["value"] = max(diffs["value"], abs(ours.metrics[subtask].value - reference["value"]))
        diffs["stderr"] = max(diffs["stderr"], abs(ours.metrics[subtask].stderr - reference["stderr"]))
        for sample in (s for s in ours.samples if s["subtask"] == subtask):
            theirs = reference["loglikelihoods"][sample["doc_id"]]
            diffs["loglikelihood"] = max([diffs["loglikelihood"]] + [abs(a - b) for a, b in
                                                                     zip(sample["loglikelihoods"], theirs, strict=True)])
            diffs["samples"] += 1
    return diffs


def main() -> None:
    from harness.inputs.models import materialize_embedded
    from harness.inputs.paths import default_cache_dir
    from harness.protocols import Checkpoint, TaskContext
    from tasks.truthfulqa_mc import TruthfulQAMC

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default: all 817)")
    parser.add_argument("--chat", action="store_true", help="prompt through the chat template (both routes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", default=os.environ.get("ALIGN_HARNESS_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()

    model = Path(args.model) if args.model else materialize_embedded("smollm2-135m-instruct", default_cache_dir())
    mc_file = Path(args.data) / "truthfulqa" / "mc_task.json"
    with tempfile.TemporaryDirectory() as work:
        started = time.time()
        ours = TruthfulQAMC(limit=args.limit).evaluate(
            Checkpoint(path=model, setting="instruct", use_chat_template=args.chat),
            TaskContext(data_mirror=Path(args.data), cache_dir=Path(work), device="cpu", batch_size=args.batch_size))
        ours_seconds = time.time() - started
        started = time.time()
        stock = stock_scores(model, stock_rows(mc_file, args.limit), args.chat, Path(work), args.batch_size)
        stock_seconds = time.time() - started
    diffs = compare(ours, stock)
    print(f"model {model}  questions {ours.details['questions']}  chat template {args.chat}")
    print(f"{'':8} {'harness':>18} {'lm-eval stock':>18}")
    for subtask in SUBTASKS.values():
        mine, theirs = ours.metrics[subtask], stock[subtask]
        print(f"{subtask:8} {mine.value:10.6f} ±{mine.stderr:.6f} {theirs['value']:10.6f} ±{theirs['stderr']:.6f}")
    print(f"seconds  {ours_seconds:18.0f} {stock_seconds:18.0f}")
    print(f"max |difference|: metric {diffs['value']:.2e}, stderr {diffs['stderr']:.2e}, "
          f"per-choice log-likelihood {diffs['loglikelihood']:.2e} over {diffs['samples']} scored questions")


if __name__ == "__main__":
    main()
