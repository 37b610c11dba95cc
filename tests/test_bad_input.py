"""Bad input through the real ``align-harness`` entry point (README: Bad input): one line
``align-harness: error: <what is wrong> ; <what to do>`` naming the key, file or line, exit status 2, and nothing
written — no results folder, no ``.hydra/``, no log file, no record, no rewritten ``sweep_config.yaml``.

Every refusal here happens before any model work, so each case takes a second or two."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import DATA_MIRROR, REPO, run_cli, run_cli_forked

TINY = ["model=tiny-random", "budget=micro", "budget@stage_budget=micro", "tasks=[truthfulqa_mc]",
        "+task_params.truthfulqa_mc.limit=2", "eval_batch_size=4"]
GOOD_ROW = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
ROWS_GZ = gzip.compress("".join(json.dumps({"chosen": f"\n\nHuman: hi {n}\n\nAssistant: hello",
                                                "rejected": f"\n\nHuman: hi {n}\n\nAssistant: no"}) + "\n"
                                    for n in range(2000)).encode())
RECORD = {"run_id": "r1", "task_key": "truthfulqa_mc-k1", "sweep": "t", "family": "tiny-random", "setting": "instruct",
          "method": "start", "task": "truthfulqa_mc", "status": "ok",
          "metrics": {"mc1": {"value": 0.5, "stderr": 0.1, "higher_is_better": True}}}


def snapshot(folder: Path) -> dict[str, str] | None:
    """Everything under ``folder`` (hidden files too): path → content hash; None when it does not exist."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            for path in sorted(folder.rglob("*"))}


def repository_top() -> set[str]:
    """Hydra's run folder is the current one (the repository): a refusal must leave no .hydra/, outputs/ or log there."""
    return {entry.name for entry in REPO.iterdir()}


def assert_refused(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("align-harness: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sweep(results: Path, cache: Path, *overrides: str):
    return run_cli_forked("sweep", *TINY, f"paths.results={results}", "name=t", *overrides, cache=cache)


@pytest.fixture
def earlier_sweep(tmp_path) -> Path:
    """A results folder an earlier sweep left: one ok record and its sweep_config.yaml."""
    folder = tmp_path / "results" / "t"
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text(json.dumps(RECORD) + "\n")
    (folder / "sweep_config.yaml").write_text("# the earlier sweep's config\n")
    return tmp_path / "results"


@pytest.mark.parametrize("overrides, fragments", [
    # types and ranges of the budget (both budgets), each naming its key
    (["budget.pairs=abc"], ["budget.pairs='abc' must be a whole number >= 1"]),
    (["budget.pairs=4.5"], ["budget.pairs=4.5 must be a whole number >= 1"]),
    (["budget.epochs=true"], ["budget.epochs=True must be a whole number >= 1"]),
    (["budget.seed=abc"], ["budget.seed='abc' must be a whole number >= 0"]),
    (["budget.warmup_ratio=1.0"], ["budget.warmup_ratio=1.0 must be a number in [0, 1)"]),
    (["budget.weight_decay=-0.1"], ["budget.weight_decay=-0.1 must be a number >= 0"]),
    (["budget.max_grad_norm=0"], ["budget.max_grad_norm=0 must be a number > 0"]),
    (["budget.precision=fp8"], ["budget.precision='fp8' is not one of fp32, bf16, fp16, auto"]),
    (["budget.lora.r=0"], ["budget.lora.r=0 must be a whole number >= 1"]),
    (["budget.lora.dropout=1.5"], ["budget.lora.dropout=1.5 must be a number in [0, 1)"]),
    (["stage_budget.micro_batch_pairs=0"], ["stage_budget.micro_batch_pairs=0 must be a whole number >= 1"]),
    (["budget.pairs=100000"], ["budget.pairs=100000 but hh-harmless has only 2051 training pairs"]),
    # the data set's fields
    (["data.heldout_pairs=-100"], ["data.heldout_pairs=-100 must be a whole number >= 0"]),
    (["data.heldout_pairs=-5"], ["data.heldout_pairs=-5 must be a whole number >= 0"]),
    (["data.heldout_pairs=5000"], ["data.heldout_pairs=5000 leaves no training pairs", "lower data.heldout_pairs"]),
    (["data.split_seed=1.5"], ["data.split_seed=1.5 must be a whole number"]),
    (["data_mirror=/does/not/exist"], ["data_mirror=/does/not/exist is not a folder"]),
    # evaluation settings and the sweep's own keys
    (["device=tpu"], ["device='tpu' is not a device; write device=auto, cpu, cuda, cuda:<index> or mps"]),
    (["device=cuda:7"], ["device=cuda:7: this machine has"]),
    (["eval_batch_size=0"], ["eval_batch_size=0 must be a whole number >= 1"]),
    (["engine=fast"], ["engine='fast' is not an engine; write engine=harness (default), hf or vllm"]),
    (["engine=vllm"], ["engine=vllm runs on CUDA GPUs only and this sweep's device is cpu"]),
    (["eval_batch_size=2.5"], ["eval_batch_size=2.5 must be a whole number >= 1"]),
    (["eval_precision=fp16"], ["eval_precision='fp16' is not one of fp32, bf16; choose one"]),
    (["launch.processes=0"], ["launch.processes=0 must be a whole number >= 1"]),
    (["launch.processes=2", "launch.accelerate_config=tpu"], ["launch.accelerate_config=tpu: no such config",
                                                              "cpu, ddp, fsdp, zero3"]),
    (["launch.processes=3"], ["launch.processes=3: budget.batch_pairs=4 is not a multiple of "
                              "micro_batch_pairs×processes=6"]),
    (["tune.trials=-1"], ["tune.trials=-1 must be a whole number >= 0"]),
    (["tasks=[heldout_preference]", "tune.trials=1", "+task_params.heldout_preference.limit=null"],
     ["tune.trials=1 selects on the last 64 of the", "heldout_preference scores the first", "they overlap",
      "set +task_params.heldout_preference.limit="]),
    (["include_start=maybe"], ["include_start='maybe' must be true or false"]),
    (["tasks=heldout_preference"], ["tasks=heldout_preference is not a list; write tasks=[heldout_preference]"]),
    (["methods=dpo"], ["methods=dpo is not a list; write methods=[dpo]"]),
    (["tasks=[]"], ["tasks is empty; name at least one task"]),
    (["settings=[]"], ["settings is empty; name at least one of pretrained, sft, instruct"]),
    (["methods=[dpo,dpo]"], ["methods names 'dpo' twice"]),
    (["settings=[chat]"], ["unknown setting 'chat'"]),
    (["methods=[dpo,nope]"], ["unknown method 'nope'; available: "]),
    (["tasks=[nope]"], ["unknown task 'nope'; available: "]),
    (["model.checkpoints.instruct=/does/not/exist"], ["model.checkpoints.instruct=/does/not/exist: no model folder"]),
    (["model=nope"], ["unknown model 'nope'", "available: "]),
    (["budget=nope"], ["unknown budget 'nope'", "available: "]),
    (["budget@stage_budget=nope"], ["unknown budget 'nope'", "available: "]),
    (["data=nope"], ["unknown data 'nope'", "available: "]),
    # method and task parameters: type by the signature's annotation, range by the name
    (["methods=[dpo]", "+method_params.dpo.learning_rate=-1"], ["method_params.dpo.learning_rate=-1 must be > 0",
                                               "align-harness describe method dpo"]),
    (["methods=[dpo]", "+method_params.dpo.beta=abc"], ["method_params.dpo.beta='abc' must be a number"]),
    (["methods=[dpo]", "+method_params.dpo.label_smoothing=0.7"], ["method_params.dpo.label_smoothing=0.7 must be in [0, 0.5)"]),
    (["methods=[kto]", "+method_params.kto.desirable_weight=-1"], ["method_params.kto.desirable_weight=-1 must be >= 0"]),
    (["methods=[kto]", "+method_params.kto.data_order=random"],
     ["method_params.kto.data_order='random' is not one of seeded, sequential; choose one"]),
    (["methods=[self_rewarding]", "+method_params.self_rewarding.rounds=0"],
     ["method_params.self_rewarding.rounds=0 must be >= 1"]),
    (["methods=[self_rewarding]", "+method_params.self_rewarding.samples=1"],
     ["method_params.self_rewarding.samples=1 must be >= 2"]),
    (["methods=[grpo]", "+method_params.grpo.temperature=0"], ["method_params.grpo.temperature=0 must be > 0"]),
    (["+method_params.dpoo.beta=0.1"], ["method_params.dpoo: unknown method 'dpoo'"]),
    (["methods=[dpo]", "+method_params.dpo.betaa=0.1"], ["method_params.dpo.betaa is not a parameter of method 'dpo'"]),
    (["+task_params.truthfulqa_mc.num_fewshot=1.5"], ["task_params.truthfulqa_mc.num_fewshot=1.5 must be a whole number",
                                                       "align-harness describe task truthfulqa_mc"]),
    (["task_params.truthfulqa_mc.limit=0"], ["task_params.truthfulqa_mc.limit=0 must be >= 1"]),
    # Hydra's grammar, read before composing: what to write instead
    (["method=dpo,"], ["argument 'method=dpo,' is not a valid override", "write methods=[dpo]"]),
    (["methods=[dpo"], ["argument 'methods=[dpo' is not a valid override", "'[' and ']' do not pair up",
                        "write methods=[dpo]"]),
    (["methods=[dpo,,kto]"], ["an empty name", "write methods=[dpo,kto]"]),
    (["method=dpo,kto"], ["is a comma list", "only under -m", "write methods=[dpo,kto]"]),
    (["method=[dpo,kto]"], ["method= takes one name; write methods=[dpo,kto]"]),
    (["budget.pairz=3"], ["budget.pairz is not a key of the config", "+budget.pairz=<value>"]),
    (["methods=[ppo]", "reward.pairs=0"], ["reward.pairs=0: give a whole number of training pairs (>= 1)"]),
    (["name=${nope}"], ["name: Interpolation key 'nope' not found"]),
])
def test_bad_setting_is_one_line_exit_2_and_changes_nothing(earlier_sweep, cache_dir, overrides, fragments):
    before, top = snapshot(earlier_sweep), repository_top()
    assert_refused(sweep(earlier_sweep, cache_dir, *overrides), *fragments)
    assert snapshot(earlier_sweep) == before  # no .hydra/, no record, sweep_config.yaml as it was
    assert repository_top() == top


def test_no_results_folder_for_a_refused_sweep(tmp_path, cache_dir):
    results = tmp_path / "results"
    assert_refused(sweep(results, cache_dir, "budget.pairs=abc"), "budget.pairs='abc'")
    assert not results.exists()


@pytest.mark.parametrize("sweep_override, fragment", [("eval_batch_size=4,0", "eval_batch_size=0 must be a whole number"),
                                                     ("budget.pairz=1,2", "budget.pairz is not a key of the config")])
def test_multirun_checks_every_job_before_hydra_writes_its_sweep_folder(tmp_path, cache_dir, sweep_override, fragment):
    results = tmp_path / "results"
    assert_refused(run_cli("sweep", "-m", *TINY, f"paths.results={results}", "name=t", sweep_override, cache=cache_dir),
                   fragment)
    assert not results.exists()  # no .multirun/<time>/multirun.yaml either


def _mirror(tmp_path: Path, name: str, content: bytes) -> Path:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(content)
    return mirror


@pytest.mark.parametrize("name, content, fragments", [
    ("rows.jsonl", (GOOD_ROW + "\n").encode() + b'{"chosen": "caf\xe9"}\n', ["rows.jsonl:2: not UTF-8 text (byte 0xe9"]),
    ("rows.jsonl.gz", gzip.compress((GOOD_ROW + "\n").encode() + b'{"chosen": "caf\xe9"}\n'),
     ["rows.jsonl.gz:2: not UTF-8 text"]),
    ("rows.jsonl.gz", ROWS_GZ[: len(ROWS_GZ) // 2],
     ["rows.jsonl.gz:", "the gzip data ends early or is corrupt"]),
    ("rows.jsonl.gz", (GOOD_ROW + "\n").encode(), ["rows.jsonl.gz: not a gzip file although named .gz"]),
    ("rows.jsonl", (GOOD_ROW + "\n{not json\n").encode(), ["rows.jsonl:2: not valid JSON"]),
    ("rows.jsonl", (GOOD_ROW + "\n[1, 2]\n").encode(), ["rows.jsonl:2: expected a JSON object per line"]),
    ("rows.jsonl", (GOOD_ROW + "\n" + json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: x"}) + "\n").encode(),
     ["rows.jsonl:2: field 'rejected' is missing"]),
], ids=["not-utf8", "not-utf8-in-gzip", "truncated-gzip", "not-gzip", "not-json", "not-an-object", "missing-field"])
def test_unreadable_data_file_names_file_and_line(tmp_path, cache_dir, name, content, fragments):
    mirror = _mirror(tmp_path, name, content)
    results = tmp_path / "results"
    result = sweep(results, cache_dir, f"data_mirror={mirror}", f"data.mirror_file={name}", "data.heldout_pairs=0")
    assert_refused(result, str(mirror / name), *fragments)
    assert not results.exists()


def test_missing_data_file_says_where_to_point(tmp_path, cache_dir):
    results = tmp_path / "results"
    result = sweep(results, cache_dir, f"data_mirror={tmp_path}", "data.mirror_file=nope.jsonl")
    assert_refused(result, f"data file {tmp_path / 'nope.jsonl'} does not exist; set data_mirror=")
    assert not results.exists()


@pytest.mark.parametrize("layout", ["results is a file", "results/<name> is a file"])
def test_results_path_that_is_a_file(tmp_path, cache_dir, layout):
    file = tmp_path / "results"
    if layout == "results is a file":
        file.write_text("not a folder\n")
    else:
        (tmp_path / "results").mkdir()
        file = tmp_path / "results" / "t"
        file.write_text("not a folder\n")
    before = snapshot(tmp_path)
    assert_refused(sweep(tmp_path / "results", cache_dir), f"paths.results: {file} is a file, not a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: see the in-process test below")
def test_read_only_results_folder(tmp_path, cache_dir):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        assert_refused(sweep(results, cache_dir), f"paths.results: cannot write in {results}")
        assert snapshot(results) == {}
    finally:
        results.chmod(0o755)


def test_read_only_results_folder_in_process(tmp_path, monkeypatch, capsys):
    """The same refusal through ``harness.cli.main`` in this process, with the folder reported unwritable (root, who
    runs some CI containers, may write into a 0o555 folder)."""
    from hydra.core.global_hydra import GlobalHydra

    from harness.cli import main

    results = tmp_path / "results"
    results.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != results and real_access(path, mode, **kw))
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", *TINY, f"paths.results={results}", "name=t", f"paths.cache={tmp_path / 'cache'}",
                  f"data_mirror={DATA_MIRROR}"])
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"align-harness: error: paths.results: cannot write in {results} (permission denied); "
                     f"choose a folder you can write in"]
    assert snapshot(results) == {} and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("line, fragment", [
    (dict(RECORD, metrics="oops"), "field 'metrics' is 'oops', not an object"),
    (dict(RECORD, metrics={"mc1": {"value": "high", "stderr": None, "higher_is_better": True}}),
     "metrics.mc1.value is 'high', not a number or null"),
    (dict(RECORD, metrics={"mc1": {"value": 0.5, "stderr": None, "higher_is_better": "yes"}}),
     "metrics.mc1.higher_is_better is 'yes', not true or false"),
    (dict(RECORD, status="done"), "field 'status' is 'done', not one of ok, failed, skipped"),
    ({key: value for key, value in RECORD.items() if key != "task"}, "record lacks field 'task'"),
    ("{not json", "not a JSON record"),
])
def test_malformed_record_is_refused_with_file_and_line(earlier_sweep, cache_dir, line, fragment):
    records = earlier_sweep / "t" / "records.jsonl"
    with records.open("a") as handle:
        handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    before = snapshot(earlier_sweep)
    assert_refused(run_cli("leaderboard", str(earlier_sweep / "t"), cache=cache_dir), f"{records}:2: {fragment}",
                   "fix or remove the line")
    assert snapshot(earlier_sweep) == before
    # a sweep into that folder is refused the same way before it writes anything (sweep_config.yaml included)
    assert_refused(sweep(earlier_sweep, cache_dir, "settings=[instruct]", "methods=[]"), f"{records}:2: {fragment}")
    assert snapshot(earlier_sweep) == before


LIST_ROW = json.dumps({"prompt": "hi", "responses": ["hello", "sure", "no"], "scores": [2, 1, 0]})


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "hi", "responses": ["hello"], "scores": [1]}, "field 'responses' must be a list of at least 2"),
    ({"prompt": "hi", "responses": ["hello", "sure", "no"], "scores": [2, 1]}, "field 'scores' must be 3 finite"),
    ({"prompt": "hi", "responses": ["hello", "sure", "no"], "ranks": [1, 0, 2]}, "field 'ranks' must be 3 positive"),
    ({"prompt": "hi", "responses": ["hello", "sure", "no"]}, "field 'scores' (higher better) or 'ranks'"),
    ({"prompt": "hi", "responses": ["hello", "no"], "scores": [1, 0]}, "field 'responses' has 2 responses, row 1 has 3"),
], ids=["one-response", "scores-short", "rank-zero", "no-scores", "other-k"])
def test_bad_list_row_names_file_row_and_field(tmp_path, cache_dir, row, fragment):
    """A list data set (format: list) refuses a malformed row like the pair formats: file, row, field."""
    mirror = _mirror(tmp_path, "lists.jsonl", (LIST_ROW + "\n" + json.dumps(row) + "\n").encode())
    results = tmp_path / "results"
    result = sweep(results, cache_dir, "data=toy-lists", "data.format=list", f"data_mirror={mirror}",
                   "+data.mirror_file=lists.jsonl", "data.heldout_pairs=0", "methods=[lipo]")
    assert_refused(result, f"{mirror / 'lists.jsonl'}:2: ", fragment)
    assert not results.exists()
