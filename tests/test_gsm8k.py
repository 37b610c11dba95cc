"""tasks.gsm8k: lm-eval's gsm8k on local data, batch-size invariance, parity with the stock task, bad input.

CPU only, no network: a 2-layer random Llama whose greedy outputs vary with the prompt
(``varied_tiny_model`` in conftest), 4 questions, 8 new tokens; data from the offline mirror.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from harness.run import registry
from harness.errors import HarnessError, SkipRun
from harness.protocols import Checkpoint, Task, TaskContext
from tasks.gsm8k import GSM8K, read_jsonl, write_task_config

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data"))
TEST_FILE = MIRROR / "gsm8k" / "test.jsonl"
TINY = {"limit": 4, "max_new_tokens": 8}

needs_mirror = pytest.mark.skipif(not TEST_FILE.is_file(), reason=f"offline data mirror not found at {TEST_FILE}")


def context(cache_dir: Path, batch_size: int = 8, mirror: Path | None = MIRROR) -> TaskContext:
    return TaskContext(data_mirror=mirror, cache_dir=cache_dir, device="cpu", batch_size=batch_size)


@pytest.fixture(scope="module")
def scored(varied_tiny_model, tmp_path_factory):
    """The same checkpoint scored plain at batch sizes 1 and 8, and through the chat template at 8."""
    cache = tmp_path_factory.mktemp("gsm8k-cache")
    results = {}
    for key, chat, batch_size in (("plain-1", False, 1), ("plain-8", False, 8), ("chat-8", True, 8)):
        checkpoint = Checkpoint(path=varied_tiny_model, setting="instruct", use_chat_template=chat)
        results[key] = GSM8K(**TINY).evaluate(checkpoint, context(cache, batch_size))
    return results


def test_config_builds_the_task():
    config = yaml.safe_load((REPO / "conf" / "task" / "gsm8k.yaml").read_text())
    assert (REPO / "conf" / "task" / "gsm8k.yaml").read_text().startswith("# Used by: align-harness sweep tasks=[gsm8k]")
    task = registry.instantiate("task", "gsm8k", params_key="task_params")  # the sweep's own route
    assert config["primary_metrics"]
    assert isinstance(task, Task)
    assert (task.name, task.version, task.limit, task.num_fewshot, task.max_new_tokens) == ("gsm8k", "1", 4, 5, 256)


@needs_mirror
def test_batch_size_does_not_change_any_sample(scored):
    one, eight = scored["plain-1"], scored["plain-8"]
    generations = [s["generation"] for s in one.samples]
    assert len(set(generations)) == len(generations) == 4, "the test model must give different text per question"
    assert one.samples == eight.samples
    assert {k: (m.value, m.stderr) for k, m in one.metrics.items()} == {k: (m.value, m.stderr) for k, m in eight.metrics.items()}


@needs_mirror
def test_metrics_and_samples(scored):
    result = scored["plain-8"]
    assert set(result.metrics) == {"exact_match_strict", "exact_match_flexible"}
    for name, metric in result.metrics.items():
        assert metric.higher_is_better is True and metric.stderr is not None
        assert metric.value == pytest.approx(sum(s["scores"][name] for s in result.samples) / 4)
    rows = [json.loads(line) for line in TEST_FILE.read_text().splitlines()[:4]]
    assert [s["question"] for s in result.samples] == [row["question"] for row in rows]
    assert [s["item_id"] for s in result.samples] == ["0", "1", "2", "3"]
    for sample, row in zip(result.samples, rows):
        assert sample["target"] == row["answer"].split("####")[-1].strip()
        assert sample["prompt"].endswith(f"Question: {row['question']}\nAnswer:")
        assert sample["prompt"].count("Question: ") == 6  # 5 exemplars + the question
        assert "####" in sample["prompt"].split("Question: ")[1]  # exemplars carry worked solutions
        for suffix in ("strict", "flexible"):
            assert sample[f"correct_{suffix}"] in (0.0, 1.0) and isinstance(sample[f"extracted_{suffix}"], str)
    json.dumps(result.samples), json.dumps(result.details)
    assert result.details["lm_eval_task"]["version"] == 3.0 and result.details["questions"] == 4


@needs_mirror
def test_chat_route_is_multiturn_fewshot_in_the_template(scored):
    plain, chat = scored["plain-8"], scored["chat-8"]
    prompt = chat.samples[0]["prompt"]
    assert prompt.count("<|im_start|>user\nQuestion: ") == 6 and prompt.count("<|im_start|>assistant\n") == 6
    assert prompt.endswith("<|im_start|>assistant\n")
    assert chat.details["chat_template"] is chat.details["fewshot_as_multiturn"] is True
    # same exemplars in both routes: every exemplar question of the plain prompt is a user turn of the chat one
    exemplar_questions = [part.split("\nAnswer:")[0] for part in plain.samples[0]["prompt"].split("Question: ")[1:]]
    assert all(f"Question: {question}\nAnswer:<|im_end|>" in prompt for question in exemplar_questions)


@needs_mirror
def test_parity_with_the_stock_lm_eval_task(scored, varied_tiny_model, tmp_path):
    """lm-eval's registered gsm8k, only its data source and length overridden, gives our samples and numbers."""
    import lm_eval
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = scored["plain-8"]
    data = {"train": str(MIRROR / "gsm8k" / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    (tmp_path / "test.jsonl").write_text("".join(TEST_FILE.read_text().splitlines(keepends=True)[:4]))
    stock_dir = Path(lm_eval.tasks.__file__).parent / "gsm8k"
    stock_generation = yaml.safe_load((stock_dir / "gsm8k.yaml").read_text())["generation_kwargs"]
    stock = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(varied_tiny_model), device="cpu", batch_size=8, dtype="float32"),
        tasks=[{"group": "parity", "task": [{"task": "gsm8k", "dataset_path": "json", "dataset_name": None,
                                             "dataset_kwargs": {"data_files": data},
                                             "generation_kwargs": {**stock_generation, "max_gen_toks": 8}}]}],
        task_manager=TaskManager(include_defaults=False, include_path=str(stock_dir)),
    )
    for lm_eval_filter, suffix in (("strict-match", "strict"), ("flexible-extract", "flexible")):
        assert ours.metrics[f"exact_match_{suffix}"].value == stock["results"]["gsm8k"][f"exact_match,{lm_eval_filter}"]
    stock_samples = {(s["doc_id"], s["filter"]): s for s in stock["samples"]["gsm8k"]}
    for sample in ours.samples:
        entry = stock_samples[(sample["doc_id"], "strict-match")]
        assert (sample["prompt"], sample["generation"]) == (entry["arguments"][0][0], entry["resps"][0][0])
        assert sample["extracted_flexible"] == stock_samples[(sample["doc_id"], "flexible-extract")]["filtered_resps"][0]


def test_generated_config_keeps_lm_eval_extraction_and_stops(tmp_path):
    """What the docstring promises: the stock filters, stop strings and greedy decoding, our data and length."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = write_task_config(tmp_path / "train.jsonl", tmp_path / "test.jsonl", 5, 256, tmp_path)
    config = load_yaml(path)  # resolves the include as lm-eval's task loader does
    filters = {f["name"]: f["filter"][0]["regex_pattern"] for f in config["filter_list"]}
    assert filters == {"strict-match": r"#### (\-?[0-9\.\,]+)", "flexible-extract": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"}
    assert config["generation_kwargs"]["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert config["generation_kwargs"]["do_sample"] is False and config["generation_kwargs"]["max_gen_toks"] == 256
    assert config["doc_to_text"] == "Question: {{question}}\nAnswer:" and config["num_fewshot"] == 5
    assert config["dataset_kwargs"]["data_files"] == {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}


def test_missing_file_names_path_and_setting(tmp_path):
    with pytest.raises(HarnessError) as error:
        GSM8K(limit=2).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))
    message = str(error.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in message
    assert "data_mirror=" in message and "ALIGN_HARNESS_DATA" in message and "\n" not in message


GOOD = {"question": "1+1?", "answer": "1+1=2\n#### 2"}


@pytest.mark.parametrize("bad_line, field", [
    (json.dumps({"question": "2+2?", "answer": "4"}), "answer"),      # no final "#### <number>"
    (json.dumps({"answer": "#### 4"}), "question"),                    # missing field
    (json.dumps({"question": "2+2?", "answer": None}), "answer"),
])
@pytest.mark.parametrize("split", ["train", "test"])
def test_malformed_row_names_file_line_and_field(tmp_path, bad_line, field, split):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name in ("train", "test"):
        lines = [json.dumps(GOOD)] * 3 + ([bad_line] if name == split else [])
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HarnessError) as error:
        GSM8K(limit=2).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))
    message = str(error.value)
    assert str(folder / f"{split}.jsonl") in message and "line 4" in message and f"'{field}'" in message


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(HarnessError, match=r"test\.jsonl: line 2: not valid JSON"):
        read_jsonl(path)


def test_bad_settings(tmp_path):
    for bad in ({"limit": 0}, {"num_fewshot": -1}, {"max_new_tokens": 0}):
        with pytest.raises(HarnessError, match=f"{next(iter(bad))}="):
            GSM8K(**bad)
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / f"{name}.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(HarnessError, match="limit=3 but .* has only 1 test questions"):
        GSM8K(limit=3).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))


def test_hub_unreachable_is_a_skip(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SkipRun, match="openai/gsm8k.*data_mirror="):
        GSM8K().evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=None))


@pytest.mark.slow
@needs_mirror
def test_embedded_model_solves_in_the_exemplar_format(cache_dir):
    """SmolLM2-135M-Instruct, base prompt, 2 questions: it imitates the exemplars ("#### <number>")."""
    from harness.inputs.models import materialize_embedded

    checkpoint = Checkpoint(materialize_embedded("smollm2-135m-instruct", cache_dir), "pretrained", False)
    result = GSM8K(limit=2).evaluate(checkpoint, context(cache_dir / "tasks"))
    assert all(s["generation"].strip() for s in result.samples)
    assert any(s["extracted_strict"] != "[invalid]" for s in result.samples)
