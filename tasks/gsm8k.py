"""GSM8K grade-school math, few-shot chain of thought, scored by lm-eval's own ``gsm8k`` task.

The prompt, the few-shot draw, the generation settings, the answer extraction and the metric are
exactly lm-eval's ``gsm8k`` (``lm_eval/tasks/gsm8k/gsm8k.yaml``, version 3): the task YAML this
module hands to lm-eval ``include``s the stock YAML from the installed package and changes only
where the data comes from and how many tokens may be generated. Stock behaviour, for reference:

* prompt: ``num_fewshot`` (default 5) solved problems drawn from the **train** split by lm-eval's
  seeded sampler (``fewshot_random_seed`` 1234), each ``Question: <q>\\nAnswer: <worked solution
  ending in "#### <number>">``, then ``Question: <test question>\\nAnswer:``; the exemplars'
  worked solutions are the chain of thought the model imitates (Cobbe et al. 2021,
  arXiv:2110.14168);
* greedy decoding until ``Question:``, ``</s>``, ``<|im_end|>`` or the tokenizer's EOS, at most
  ``max_new_tokens`` tokens;
* answer extraction, two named lm-eval filters on the same generation:
  ``strict-match`` — the first ``#### (-?[0-9.,]+)`` (the answer in the exemplars' format);
  ``flexible-extract`` — the last number in the text, ``(-?[$0-9.,]{2,})|(-?[0-9]+)``;
* ``exact_match`` against the reference answer after ``#### ``, ignoring case, commas, ``$`` and a
  trailing period.

**Instruct and SFT checkpoints** (``checkpoint.use_chat_template``) get lm-eval's own chat route,
``apply_chat_template=True`` with ``fewshot_as_multiturn=True`` (the Open LLM Leaderboard v2
setting): each exemplar becomes a user turn (``Question: ...\\nAnswer:``) and an assistant turn (its
worked solution), then the test question as the last user turn, rendered by the checkpoint's own
template. Same exemplars, same extraction, same metric.

Data: the mirror's ``gsm8k/train.jsonl`` (few-shot pool, 7,473) and ``gsm8k/test.jsonl`` (scored,
1,319), ``{"question", "answer"}`` rows, validated here and written into the cache as the json
files lm-eval reads — the test file cut to its first ``limit`` questions, so lm-eval sees exactly
the scored subset (its few-shot draw for question *i* is the same as in a stock run with the same
limit). Without a mirror, the hub's ``openai/gsm8k`` (config ``main``) is read instead.

Metrics: ``exact_match_strict``, ``exact_match_flexible`` (lm-eval's ``exact_match`` under each
filter, with its standard error; higher is better).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.errors import HarnessError, SkipRun
from harness.inputs.cache import ensure_file
from harness.inputs.paths import atomic_write_text
from harness.protocols import Checkpoint, ScoringCost, ScoringEstimate, TaskContext, TaskResult
from harness.evaluate.task_support import limit_fits, lm_eval_metric, run_lm_eval, whole_number

LM_EVAL_TASK = "gsm8k"  # the stock task this one includes
FILTERS = {"strict-match": "strict", "flexible-extract": "flexible"}  # lm-eval filter -> our metric suffix
SPLITS = ("train", "test")
FIELDS = ("question", "answer")


class GSM8K:
    """The ``gsm8k`` task; constructed from ``conf/task/gsm8k.yaml``."""

    def __init__(
        self,
        name: str = "gsm8k",
        version: str = "1",
        limit: int | None = 4,
        num_fewshot: int = 5,
        max_new_tokens: int = 256,
        mirror_dir: str = "gsm8k",
        hub_id: str = "openai/gsm8k",
        hub_config: str = "main",
    ) -> None:
        whole_number(name, "limit", limit, optional=True, unit="questions")
        whole_number(name, "num_fewshot", num_fewshot, minimum=0)
        whole_number(name, "max_new_tokens", max_new_tokens, unit="tokens")
        self.name = name
        self.version = str(version)
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.max_new_tokens = max_new_tokens
        self.mirror_dir = mirror_dir
        self.hub_id = hub_id
        self.hub_config = hub_config

    QUESTIONS = 1319        # test.jsonl, scored when limit is null
    SHOT_TOKENS = 196       # measured, SmolLM2 tokenizer: mean "Question: ...\nAnswer: ...\n\n" of the first 500 train rows
    QUESTION_TOKENS = 66    # measured likewise: mean "Question: ...\nAnswer:" of the first 500 test rows

    def scoring_cost(self, estimate: ScoringEstimate) -> ScoringCost:
        """``align-harness plan``: the few-shot prompt at its measured mean length, then ``max_new_tokens`` decoded
        for every question (a batch runs until its last row stops, which on small models is the cap)."""
        questions = self.QUESTIONS if self.limit is None else min(self.limit, self.QUESTIONS)
        prompt = self.num_fewshot * self.SHOT_TOKENS + self.QUESTION_TOKENS
        return ScoringCost(policy_tokens=questions * (prompt + self.max_new_tokens),
                           note=f"{questions} questions × ({prompt} prompt + {self.max_new_tokens} generated) tokens")

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        """Generate for the first ``limit`` test questions with lm-eval (``run_lm_eval``) and score both filters."""
        import lm_eval

        splits, source = self._read_splits(context.data_mirror)
        test_rows = splits["test"]
        limit_fits(self.name, self.limit, len(test_rows), source, "test questions")
        if self.num_fewshot > len(splits["train"]):
            raise HarnessError(f"{self.name}: num_fewshot={self.num_fewshot} but the train split has only "
                               f"{len(splits['train'])} rows to draw exemplars from")
        work_dir = Path(context.cache_dir) / "gsm8k"
        train_file, train_sha256 = write_data_file(splits["train"], work_dir, "train")
        test_file, test_sha256 = write_data_file(test_rows[: self.limit], work_dir, "test")
        task_file = write_task_config(train_file, test_file, self.num_fewshot, self.max_new_tokens, work_dir)
        out = run_lm_eval(checkpoint, context, [task_file], fewshot_as_multiturn=checkpoint.use_chat_template)

        metrics = {f"exact_match_{suffix}": lm_eval_metric(out, LM_EVAL_TASK, "exact_match", lm_eval_filter)
                   for lm_eval_filter, suffix in FILTERS.items()}
        samples = merge_filter_samples(out["samples"][LM_EVAL_TASK])
        return TaskResult(
            metrics=metrics,
            samples=samples,
            details={
                "lm_eval_version": lm_eval.__version__,
                "lm_eval_task": {"name": LM_EVAL_TASK, "version": out["versions"][LM_EVAL_TASK],
                                 "config": str(task_file)},
                "chat_template": bool(checkpoint.use_chat_template),
                "fewshot_as_multiturn": bool(checkpoint.use_chat_template),
                "num_fewshot": self.num_fewshot,
                "max_new_tokens": self.max_new_tokens,
                "limit": self.limit,
                "questions": len(samples),
                "source": source,
                "data_files": {"train": str(train_file), "test": str(test_file)},
                "data_sha256": {"train": train_sha256, "test": test_sha256},
                "first_prompt": samples[0]["prompt"] if samples else None,  # exemplars and template included
            },
        )

    def _read_splits(self, data_mirror: Path | None) -> tuple[dict[str, list[dict]], str]:
        """Both splits as ``{"question", "answer"}`` rows in source order, and a description of the source."""
        if data_mirror is not None:
            folder = Path(data_mirror) / self.mirror_dir
            return {split: read_jsonl(folder / f"{split}.jsonl") for split in SPLITS}, str(folder)
        source = f"hub:{self.hub_id}/{self.hub_config}"
        try:
            import datasets

            loaded = {split: datasets.load_dataset(self.hub_id, self.hub_config, split=split) for split in SPLITS}
        except Exception as error:  # offline, renamed, gated: all mean "not here"
            raise SkipRun(
                f"GSM8K data {source} is not available here ({type(error).__name__}); "
                f"set data_mirror=<folder> or ALIGN_HARNESS_DATA to a local mirror"
            ) from None
        return {split: [checked_row({f: row.get(f) for f in FIELDS}, f"{source}/{split}: row {index}")
                        for index, row in enumerate(rows)] for split, rows in loaded.items()}, source


def read_jsonl(path: Path) -> list[dict]:
    """Read one mirror split; a malformed line raises HarnessError naming file, line and field."""
    if not path.is_file():
        raise HarnessError(
            f"GSM8K data file {path} not found; set data_mirror=<folder with gsm8k/train.jsonl and gsm8k/test.jsonl> "
            f"(or the ALIGN_HARNESS_DATA environment variable)"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HarnessError(f"{where}: not valid JSON ({error.msg}); restore the file from the GSM8K release") from None
            rows.append(checked_row(row, where))
    return rows


def checked_row(row: object, where: str) -> dict:
    """``{"question", "answer"}`` with a non-empty question and an answer ending in ``#### <number>``."""
    if not isinstance(row, dict):
        raise HarnessError(f"{where}: expected an object with fields 'question' and 'answer'")
    for field in FIELDS:
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise HarnessError(f"{where}: field '{field}' is missing or empty")
    if "####" not in row["answer"]:
        raise HarnessError(f"{where}: field 'answer' has no final '#### <number>' (the reference answer)")
    return {"question": row["question"], "answer": row["answer"]}


def write_data_file(rows: list[dict], work_dir: Path, split: str) -> tuple[Path, str]:
    """Write ``rows`` as JSON lines, named by split, size and content hash; return (path, sha256)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = work_dir / f"gsm8k-{split}-n{len(rows)}-{sha256[:16]}.jsonl"
    ensure_file(path, text.encode("utf-8"), "converted data file")  # content-addressed: checked against the text
    return path, sha256


def write_task_config(train_file: Path, test_file: Path, num_fewshot: int, max_new_tokens: int,
                      work_dir: Path) -> Path:
    """lm-eval's stock ``gsm8k`` YAML, reading our two files and generating at most ``max_new_tokens``.

    ``generation_kwargs`` is replaced as a whole by lm-eval's include merge, so it is copied from
    the stock file with only ``max_gen_toks`` added (stock stop strings and greedy decoding kept).
    """
    import lm_eval.tasks
    import yaml

    stock = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    generation = dict(yaml.safe_load(stock.read_text())["generation_kwargs"])
    generation["max_gen_toks"] = max_new_tokens
    config = {
        "include": str(stock),
        "dataset_path": "json",
        "dataset_name": None,  # the stock "main" names a hub config; the json builder needs none
        "dataset_kwargs": {"data_files": {"train": str(train_file), "test": str(test_file)}},
        "num_fewshot": num_fewshot,
        "generation_kwargs": generation,
    }
    path = work_dir / f"{test_file.stem}.{num_fewshot}shot.{max_new_tokens}tok.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def merge_filter_samples(logged: list[dict]) -> list[dict]:
    """lm-eval logs one entry per (question, filter); merge them into one plain dict per question."""
    by_doc: dict[int, dict] = {}
    for entry in sorted(logged, key=lambda e: (int(e["doc_id"]), e["filter"])):
        doc_id = int(entry["doc_id"])
        suffix = FILTERS[entry["filter"]]
        sample = by_doc.setdefault(doc_id, {
            "doc_id": doc_id,
            "question": entry["doc"]["question"],
            "target": entry["doc"]["answer"].split("####")[-1].strip(),
            "reference_solution": entry["doc"]["answer"],
            "prompt": entry["arguments"][0][0],
            "generation": entry["resps"][0][0],
            "item_id": str(doc_id),  # stable across checkpoints: position in test.jsonl
            "scores": {},
        })
        correct = float(entry["exact_match"])
        sample[f"extracted_{suffix}"] = entry["filtered_resps"][0]
        sample[f"correct_{suffix}"] = correct
        sample["scores"][f"exact_match_{suffix}"] = correct
    return [by_doc[doc_id] for doc_id in sorted(by_doc)]
