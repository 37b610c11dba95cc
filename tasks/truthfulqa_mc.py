"""TruthfulQA multiple choice (MC1 and MC2), scored by lm-eval's own task definitions.

The prompt (lm-eval's fixed 6-shot QA primer inside ``doc_to_text``), the choices and the
metrics are exactly lm-eval's ``truthfulqa_mc1`` / ``truthfulqa_mc2``: the task YAMLs this
module hands to lm-eval ``include`` the stock YAMLs from the installed package and change
only where the data comes from. The data is always a local JSON-lines file in the hub's
layout (``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": ...}``), written
into the cache from

* the offline mirror, ``<data_mirror>/truthfulqa/mc_task.json`` (each ``*_targets`` there
  is an object answer text -> 1/0, in the hub's choice order), or
* the hub data set ``truthfulqa/truthful_qa`` (config ``multiple_choice``, split
  ``validation``) when there is no mirror,

cut to the first ``limit`` questions, so lm-eval sees exactly the scored subset.

Metrics: ``mc1`` (the true answer has the highest log-likelihood) and ``mc2`` (normalized
probability mass on the true answers), each lm-eval's ``acc`` with its standard error.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from harness.errors import HarnessError, SkipRun
from harness.inputs.cache import ensure_file
from harness.inputs.paths import atomic_write_text
from harness.protocols import Checkpoint, ScoringCost, ScoringEstimate, TaskContext, TaskResult
from harness.evaluate.task_support import limit_fits, lm_eval_metric, run_lm_eval, whole_number

SUBTASKS = {"truthfulqa_mc1": "mc1", "truthfulqa_mc2": "mc2"}  # lm-eval task -> our metric name
TARGET_FIELDS = ("mc1_targets", "mc2_targets")


class TruthfulQAMC:
    """The ``truthfulqa_mc`` task; constructed from ``conf/task/truthfulqa_mc.yaml``."""

    def __init__(
        self,
        name: str = "truthfulqa_mc",
        version: str = "1",
        limit: int | None = 24,
        num_fewshot: int = 0,
        mirror_file: str = "truthfulqa/mc_task.json",
        hub_id: str = "truthfulqa/truthful_qa",
        hub_config: str = "multiple_choice",
        hub_split: str = "validation",
    ) -> None:
        whole_number(name, "limit", limit, optional=True, unit="questions")
        whole_number(name, "num_fewshot", num_fewshot, minimum=0)
        self.name = name
        self.version = str(version)
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.mirror_file = mirror_file
        self.hub_id = hub_id
        self.hub_config = hub_config
        self.hub_split = hub_split

    QUESTIONS = 817              # mc_task.json, scored when limit is null
    TOKENS_PER_QUESTION = 2619   # measured, SmolLM2 tokenizer, mean of all 817: 12.7 requests (MC1 + MC2 choices) × (the
    #                              177-token 6-shot primer + question + answer choice)

    def scoring_cost(self, estimate: ScoringEstimate) -> ScoringCost:
        """``align-harness plan``: every request scored whole (lm-eval's hf route; the harness engine's prefix sharing
        costs less), at the mean measured length."""
        questions = self.QUESTIONS if self.limit is None else min(self.limit, self.QUESTIONS)
        return ScoringCost(policy_tokens=questions * self.TOKENS_PER_QUESTION,
                           note=f"{questions} questions × {self.TOKENS_PER_QUESTION} tokens (mean, no prefix sharing)")

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        """Score ``checkpoint`` on the first ``limit`` questions with lm-eval (``run_lm_eval``)."""
        import lm_eval

        rows, source = self._read_rows(context.data_mirror)
        limit_fits(self.name, self.limit, len(rows), source, "questions")
        work_dir = Path(context.cache_dir) / "truthfulqa_mc"
        data_file, data_sha256 = write_data_file(rows[: self.limit], work_dir)
        task_files = write_task_configs(data_file, self.num_fewshot, work_dir)
        out = run_lm_eval(checkpoint, context, task_files)

        metrics, samples = {}, []
        for task_name, metric_name in SUBTASKS.items():
            metrics[metric_name] = lm_eval_metric(out, task_name, "acc")
            logged = sorted(out["samples"][task_name], key=lambda sample: sample["doc_id"])
            samples += [sample_record(metric_name, sample) for sample in logged]

        first_prompt = out["samples"]["truthfulqa_mc1"][0]["arguments"][0][0]
        return TaskResult(
            metrics=metrics,
            samples=samples,
            details={
                "lm_eval_version": lm_eval.__version__,
                "lm_eval_tasks": {
                    task_name: {"version": out["versions"][task_name], "config": str(path)}
                    for task_name, path in zip(SUBTASKS, task_files)
                },
                "chat_template": bool(checkpoint.use_chat_template),
                "num_fewshot": self.num_fewshot,
                "limit": self.limit,
                "questions": len(rows[: self.limit]),
                "source": source,
                "data_file": str(data_file),
                "data_sha256": data_sha256,
                "first_prompt": first_prompt,  # the exact context scored for question 0 (MC1), template included
            },
        )

    def _read_rows(self, data_mirror: Path | None) -> tuple[list[dict], str]:
        """All questions in hub layout, in source order, and a description of the source."""
        if data_mirror is not None:
            path = Path(data_mirror) / self.mirror_file
            return read_mirror(path), str(path)
        source = f"hub:{self.hub_id}/{self.hub_config}/{self.hub_split}"
        try:
            import datasets

            dataset = datasets.load_dataset(self.hub_id, self.hub_config, split=self.hub_split)
        except Exception as error:  # offline, renamed, gated: all mean "not here"
            raise SkipRun(
                f"TruthfulQA data {source} is not available here ({type(error).__name__}); "
                f"set data_mirror=<folder> or ALIGN_HARNESS_DATA to a local mirror"
            ) from None
        return [{"question": row["question"], **{f: row[f] for f in TARGET_FIELDS}} for row in dataset], source


def read_mirror(path: Path) -> list[dict]:
    """Read the mirror's ``mc_task.json`` and convert every row to the hub layout."""
    if not path.is_file():
        raise HarnessError(
            f"TruthfulQA data file {path} not found; set data_mirror=<folder with truthfulqa/mc_task.json> "
            f"(or the ALIGN_HARNESS_DATA environment variable)"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_object_with_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HarnessError(f"{path}: not valid JSON ({error}); restore the file from the TruthfulQA release") from None
    if not isinstance(rows, list):
        raise HarnessError(f"{path}: expected a JSON list of questions, found {type(rows).__name__}")
    return [to_hub_layout(row, index, path) for index, row in enumerate(rows)]


def to_hub_layout(row: object, index: int, path: Path) -> dict:
    """One mirror row -> ``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": ...}``.

    Choices keep the row's key order (the hub's order). A malformed row raises HarnessError
    naming the file, the row and the field.
    """
    where = f"{path}: row {index} (question {index + 1})"
    if not isinstance(row, dict):
        raise HarnessError(f"{where}: expected an object with question, mc1_targets, mc2_targets")
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise HarnessError(f"{where}: field 'question' is missing or empty")
    converted = {"question": row["question"]}
    for field in TARGET_FIELDS:
        targets = row.get(field)
        if not isinstance(targets, dict) or not targets:
            raise HarnessError(f"{where}: field '{field}' is missing or not an object answer -> 1/0")
        if getattr(targets, "duplicates", None):
            raise HarnessError(f"{where}: field '{field}' lists the answer {targets.duplicates[0]!r} twice")
        if any(label not in (0, 1) for label in targets.values()):
            raise HarnessError(f"{where}: field '{field}' has a label other than 1 (true) or 0 (false)")
        converted[field] = {"choices": list(targets), "labels": [int(label) for label in targets.values()]}
    mc1_labels = converted["mc1_targets"]["labels"]
    if mc1_labels[0] != 1 or sum(mc1_labels) != 1:
        # lm-eval's truthfulqa_mc1 has doc_to_target: 0, i.e. it takes the first choice as the true one.
        raise HarnessError(f"{where}: field 'mc1_targets' must have exactly one true answer, listed first")
    return converted


class _JSONObject(dict):
    """A parsed JSON object that remembers keys it had more than once (json keeps the last)."""

    duplicates: list[str] = []


def _object_with_duplicates(pairs: list[tuple[str, object]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    obj.duplicates = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    return obj


def write_data_file(rows: list[dict], work_dir: Path) -> tuple[Path, str]:
    """Write ``rows`` as JSON lines, named by subset size and content hash; return (path, sha256)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = work_dir / f"truthfulqa-mc-n{len(rows)}-{sha256[:16]}.jsonl"
    ensure_file(path, text.encode("utf-8"), "converted data file")  # content-addressed: checked against the text
    return path, sha256


def write_task_configs(data_file: Path, num_fewshot: int, work_dir: Path) -> list[Path]:
    """One lm-eval task YAML per subtask: the stock YAML, reading ``data_file`` instead of the hub.

    lm-eval's loader merges ``include``d files under the including file's keys, and resolves
    the stock ``!function utils.process_results_mc2`` next to the stock YAML.
    """
    import lm_eval.tasks
    import yaml

    stock_dir = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
    paths = []
    for task_name in SUBTASKS:
        config = {
            "include": str(stock_dir / f"{task_name}.yaml"),
            "dataset_path": "json",
            "dataset_name": None,  # the stock "multiple_choice" names a hub config; the json builder needs none
            "dataset_kwargs": {"data_files": {"validation": str(data_file)}},  # the stock YAMLs score "validation"
            "num_fewshot": num_fewshot,
        }
        path = work_dir / f"{data_file.stem}.{task_name}.{num_fewshot}shot.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        paths.append(path)
    return paths


def sample_record(subtask: str, sample: dict) -> dict:
    """lm-eval's logged sample for one question -> a plain JSON-serializable dict."""
    targets = sample["doc"][f"{subtask}_targets"]
    return {
        "subtask": subtask,
        "doc_id": int(sample["doc_id"]),
        "question": sample["doc"]["question"],
        "choices": list(targets["choices"]),
        "labels": [int(label) for label in targets["labels"]],
        "loglikelihoods": [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]],
        "acc": float(sample["acc"]),
        # the harness-wide per-item convention (paired bootstrap on the leaderboard): item id + metric scores
        "item_id": str(int(sample["doc_id"])),
        "scores": {subtask: float(sample["acc"])},
    }
