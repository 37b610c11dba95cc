"""tasks.win_rate and harness.evaluate.judges: AlpacaEval's aggregation reproduced from the mirror's GPT-4 annotations,
both-order judging, batch-size invariance, the reference cache, the OpenAI-compatible judge against a real
loopback server (llm-katan), the judge-check CLI, and bad config.

CPU only, no network beyond 127.0.0.1. The tiny random Llama judges and generates everywhere except the API
test, whose server serves the embedded SmolLM2-135M-Instruct (it answers in words a parser can read).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DATA_MIRROR, run_cli
from harness.errors import HarnessError
from harness.evaluate.judges import (LocalHFJudge, OpenAIAPIJudge, RewardModelJudge, build_judge, label_probability_from_logprobs,
                            parse_verdict, read_gpt4_annotations, win_rate_from_preferences)
from harness.protocols import Checkpoint, Task, TaskContext
from tasks.win_rate import WinRate, length_controlled_scores

ANNOTATIONS = DATA_MIRROR / "alpaca_eval" / "annotations_gpt4"
needs_mirror = pytest.mark.skipif(not ANNOTATIONS.is_dir(), reason=f"offline data mirror not found at {DATA_MIRROR}")
INSTRUCTIONS = [("Name a primary color.", "Red.", "Blue is one."),
                ("What is 2 + 2?", "4", "It is four."),
                ("Say hello.", "Hello!", "Hi there, hello.")]


def context(cache: Path, batch_size: int = 8) -> TaskContext:
    return TaskContext(data_mirror=DATA_MIRROR, cache_dir=cache, device="cpu", batch_size=batch_size, show_progress=False)


# -- AlpacaEval's aggregation ------------------------------------------------------------------
@needs_mirror
@pytest.mark.parametrize("model, wins, losses, draws, win_rate, stderr", [
    ("alpaca-7b", 205, 584, 16, 26.46, 1.54),
    ("alpaca-farm-ppo-human", 328, 469, 8, 41.24, 1.73),
])
def test_reproduces_published_alpacaeval_win_rates(model, wins, losses, draws, win_rate, stderr):
    rows = json.loads((ANNOTATIONS / f"{model}.json").read_text())
    # output_2 is the judged model, output_1 the reference: preference "2" is the model's win
    assert {r["generator_1"] for r in rows} == {"text_davinci_003"} and {r["generator_2"] for r in rows} == {model}
    result = win_rate_from_preferences([r["preference"] for r in rows])
    assert (result.wins, result.losses, result.draws) == (wins, losses, draws)
    assert round(100 * result.value, 2) == win_rate and round(100 * result.stderr, 2) == stderr
    as_text = win_rate_from_preferences([str(r["preference"]) for r in rows])  # the README's "1"/"2"/"0" coding
    assert (as_text.value, as_text.stderr) == (result.value, result.stderr)
    if model == "alpaca-7b":  # why ddof = 1 (pandas' sem, as AlpacaEval): the population formula gives 1.53
        mean, n = result.value, len(result.scores)
        assert round(100 * math.sqrt(sum((s - mean) ** 2 for s in result.scores) / n / n), 2) == 1.53


def test_win_rate_coding_and_bad_preferences():
    result = win_rate_from_preferences(["2", "1", "0", 1.5, 2.0])
    assert result.scores == [1.0, 0.0, 0.5, 0.5, 1.0] and result.value == pytest.approx(0.6)
    with pytest.raises(HarnessError, match="preference 1: '3'"):
        win_rate_from_preferences(["1", "3"])


def test_verdict_parsing():
    cases = {"1": 1.0, " **2** ": 0.0, "Response 2.": 0.0, "Output (1)": 1.0, "It is a tie.": 0.5,
             "1. Paris: 1\n2": 1.0, "I think response 2 is better than response 1": 0.0, "The better one is 2": 0.0,
             "banana": None, "": None, "12 apples": None}
    assert {text: parse_verdict(text) for text in cases} == cases
    top = lambda *pairs: {"content": [{"token": "Response", "logprob": -0.1, "top_logprobs": []},  # noqa: E731
                                      {"token": "1", "logprob": -1.0,
                                       "top_logprobs": [{"token": t, "logprob": lp} for t, lp in pairs]}]}
    assert label_probability_from_logprobs(top((" 1", math.log(0.6)), ("2", math.log(0.2)))) == pytest.approx(0.75)
    assert label_probability_from_logprobs(top(("2", -0.1), ("x", -3))) == 0.0
    assert label_probability_from_logprobs(None) is None and label_probability_from_logprobs({"content": None}) is None


def test_length_control():
    y, outputs, references = [1, 0, 0.5, 1, 0, 1, 0, 0], [100, 200, 150, 120, 90, 300, 50, 80], [110] * 8
    assert length_controlled_scores(y, [100] * 8, [90] * 8) == y  # no length variation: nothing to control for
    scores = length_controlled_scores(y, outputs, references)
    assert len(scores) == 8 and all(math.isfinite(s) for s in scores) and 0 < sum(scores) / 8 < 1
    # longer outputs win and the checkpoint writes longer: the controlled win rate is lower than the raw one
    wins = [1.0 if o > 150 else 0.0 for o in range(100, 300, 5)]
    controlled = length_controlled_scores(wins, list(range(100, 300, 5)), [120] * len(wins))
    assert sum(controlled) / len(controlled) < sum(wins) / len(wins)


# -- judges on the tiny model ------------------------------------------------------------------
def test_local_judge_averages_both_orders(tiny_model):
    judge = LocalHFJudge(str(tiny_model), batch_size=4)
    judgments = judge.judge_batch(INSTRUCTIONS)
    swapped = judge.judge_batch([(i, b, a) for i, a, b in INSTRUCTIONS])
    for judgment, mirror in zip(judgments, swapped):
        assert judgment.method == "label_logits"
        for p in (judgment.probability, judgment.output_1_first, judgment.output_1_second):
            assert 0.0 <= p <= 1.0
        assert judgment.probability == pytest.approx((judgment.output_1_first + judgment.output_1_second) / 2)
        # both orders averaged: swapping the outputs gives exactly the complement, whatever the position bias
        assert judgment.probability == pytest.approx(1 - mirror.probability, abs=1e-6)
        assert judgment.output_1_first == pytest.approx(1 - mirror.output_1_second, abs=1e-6)
        assert isinstance(judgment.consistent(0.0), bool)
        raw = judgment.raw["output_1_first"]
        assert 0 < raw["label_mass"] <= 1 and raw["prompt_tokens"] > 0
    single = judge.judge(*INSTRUCTIONS[0])
    assert single.probability == pytest.approx(judgments[0].probability, abs=1e-6)


def test_reward_model_judge(tmp_path, tiny_model):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = build_judge({"type": "reward_model", "model": str(tmp_path / "rm")}, batch_size=2)
    assert isinstance(judge, RewardModelJudge)
    for judgment in judge.judge_batch(INSTRUCTIONS):
        r_1, r_2 = judgment.raw["reward_1"], judgment.raw["reward_2"]
        assert judgment.probability == pytest.approx(1 / (1 + math.exp(r_2 - r_1)))
        assert judgment.consistent(0.0) and judgment.method == "reward_difference"
    # it reports the tokens it read (both conversations of each comparison), for the FLOPs of methods that judge
    from harness.train.feedback import judged_prompt_tokens

    (instruction, output_1, output_2), = INSTRUCTIONS[:1]
    read = [len(tokenizer(judge._conversation(instruction, o), add_special_tokens=False)["input_ids"])
            for o in (output_1, output_2)]
    assert judged_prompt_tokens(judge.judge_batch(INSTRUCTIONS[:1])) == sum(read)
    with pytest.raises(HarnessError, match="is not a reward model"):
        build_judge({"type": "reward_model", "model": str(tiny_model)}).judge(*INSTRUCTIONS[0])


# -- the task ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untied_models(tmp_path_factory, tiny_model) -> list[Path]:
    """Two 2-layer random Llamas with an untied output head: unlike the harness's tied tiny models (which echo
    their last prompt token, so every seed writes the same "\\n\\n..."), they write different outputs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    paths = []
    for seed in (0, 1):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"untied-{seed}")
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def tiny_task(tiny_model: Path, **overrides) -> WinRate:
    config = {"limit": 3, "max_new_tokens": 8, "judge": {"type": "local_hf", "model": str(tiny_model)}, **overrides}
    return WinRate(**config)


@needs_mirror
def test_batch_size_invariance_and_reference_cache(tmp_path, tiny_model, untied_models):
    policy, start = untied_models
    checkpoint = Checkpoint(path=policy, setting="instruct", use_chat_template=True, reference_path=start)
    results = {size: tiny_task(tiny_model).evaluate(checkpoint, context(tmp_path / f"b{size}", size)) for size in (1, 8)}
    one, eight = results[1], results[8]
    assert [s["output"] for s in one.samples] == [s["output"] for s in eight.samples]
    assert [s["reference_output"] for s in one.samples] == [s["reference_output"] for s in eight.samples]
    assert [s["preference"] for s in one.samples] == [s["preference"] for s in eight.samples]
    assert [s["position_consistent"] for s in one.samples] == [s["position_consistent"] for s in eight.samples]
    for a, b in zip(one.samples, eight.samples):
        assert a["p_output_better"] == pytest.approx(b["p_output_better"], abs=1e-5)
        assert a["p_output_better_output_first"] == pytest.approx(b["p_output_better_output_first"], abs=1e-5)
    assert one.metrics["win_rate"].value == eight.metrics["win_rate"].value

    result = one
    assert len(result.samples) == 3 and result.details["identical_outputs"] == 0
    assert len({s["output"] for s in result.samples}) > 1
    assert set(result.metrics) == {"win_rate", "length_controlled_win_rate", "mean_output_chars",
                                   "mean_reference_chars", "position_consistency"}
    assert result.metrics["win_rate"].higher_is_better and not result.metrics["mean_output_chars"].higher_is_better
    for name, metric in result.metrics.items():  # each metric is the mean of its per-item scores
        items = [s["scores"][name] for s in result.samples if name in s["scores"]]
        assert metric.value == pytest.approx(sum(items) / len(items))
    sample = result.samples[0]
    assert {"instruction", "output", "reference_output", "p_output_better_output_first",
            "p_output_better_output_second", "preference", "item_id"} <= set(sample)
    json.dumps(result.samples), json.dumps(result.details)

    # the reference outputs are generated once: another checkpoint of the same setting reuses them
    cache = tmp_path / "b8" / "win_rate_generations"
    assert len(list(cache.glob("*.json"))) == 2
    other = Checkpoint(path=tiny_model, setting="instruct", use_chat_template=True, reference_path=start)
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    tiny_task(tiny_model).evaluate(other, context(tmp_path / "b8"))
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    assert len(after) == 3 and all(after[name] == mtime for name, mtime in before.items())


@needs_mirror
def test_start_row_is_half_by_definition_and_not_judged(tmp_path, tiny_model):
    task = tiny_task(tiny_model, limit=2)
    result = task.evaluate(Checkpoint(path=tiny_model, setting="instruct", use_chat_template=True), context(tmp_path))
    assert result.metrics["win_rate"].value == 0.5 and result.metrics["win_rate"].stderr == 0.0
    assert "position_consistency" not in result.metrics and "0.5 by definition" in result.details["note"]
    assert all(s["output"] == s["reference_output"] and s["judge_method"] == "identical" for s in result.samples)
    assert task._judge._loaded is None  # the judge's model was never loaded


@needs_mirror
def test_davinci_reference_and_config_file(tmp_path, tiny_model):
    from harness.run.registry import instantiate

    task = instantiate("task", "win_rate", {"limit": 2, "max_new_tokens": 4, "reference": "davinci003",
                                            "judge": {"model": str(tiny_model)}}, params_key="task_params")
    assert isinstance(task, Task) and task.draw_margin == 0.0 and task.generation["do_sample"] is False
    result = task.evaluate(Checkpoint(path=tiny_model, setting="instruct", use_chat_template=True), context(tmp_path))
    davinci = json.loads((DATA_MIRROR / "alpaca_eval" / "text_davinci_003" / "model_outputs.json").read_text())
    assert [s["reference_output"] for s in result.samples] == [row["output"] for row in davinci[:2]]
    assert [s["instruction"] for s in result.samples] == [row["instruction"] for row in davinci[:2]]


# -- bad config ----------------------------------------------------------------------------------
def test_bad_judge_config(monkeypatch, tiny_model):
    with pytest.raises(HarnessError, match="unknown judge type 'gpt5'.*available: local_hf, openai_api, reward_model"):
        WinRate(judge={"type": "gpt5"})
    monkeypatch.delenv("WIN_RATE_TEST_KEY", raising=False)
    with pytest.raises(HarnessError, match="environment variable WIN_RATE_TEST_KEY, which is not set") as error:
        build_judge({"type": "openai_api", "model": "gpt-4o-mini", "api_key_env": "WIN_RATE_TEST_KEY"})
    assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="judge.base_url is not a setting of the local_hf judge"):
        build_judge({"type": "local_hf", "base_url": "http://x"})
    with pytest.raises(HarnessError, match="reference='dataset_chosen' is not offered; available: start, davinci003"):
        WinRate(reference="dataset_chosen")
    with pytest.raises(HarnessError, match="no model folder there"):
        build_judge({"type": "local_hf", "model": "/nonexistent/judge"})


# -- the OpenAI-compatible judge against a real server on loopback ---------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory, cache_dir):
    """llm-katan serving the embedded model's chat completions on 127.0.0.1; stopped after the module."""
    pytest.importorskip("llm_katan", reason="the dev extra installs llm-katan (pip install -e '.[dev]')")
    from harness.inputs.models import materialize_embedded

    model_dir = materialize_embedded("smollm2-135m-instruct", cache_dir)
    folder = tmp_path_factory.mktemp("llm-katan")
    port = _free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "llm_katan.cli", "--model", str(model_dir), "--served-model-name", "smollm2-judge",
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--no-quantize", "--max-tokens", "16",
         "--stats-file", str(folder / "stats.json")],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # one thread: no spin-waiting on busy cores
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llm-katan did not come up: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_openai_api_judge_against_loopback_server(openai_server, monkeypatch):
    monkeypatch.setenv("WIN_RATE_TEST_KEY", "not-a-secret")
    judge = build_judge({"type": "openai_api", "model": "smollm2-judge", "base_url": openai_server,
                         "api_key_env": "WIN_RATE_TEST_KEY", "max_tokens": 8})
    assert isinstance(judge, OpenAIAPIJudge)
    judgments = judge.judge_batch(INSTRUCTIONS[:1])  # 2 requests: <1 s each on idle cores, up to ~15 s on busy ones
    for judgment in judgments:
        assert 0.0 <= judgment.probability <= 1.0
        assert judgment.probability == pytest.approx((judgment.output_1_first + judgment.output_1_second) / 2)
        assert judgment.method == "text"  # llm-katan sends no logprobs: the reply text is parsed
        for order in ("output_1_first", "output_1_second"):
            assert isinstance(judgment.raw[order]["text"], str) and "parsed" in judgment.raw[order]
    assert any(judgment.raw[o]["parsed"] for judgment in judgments for o in ("output_1_first", "output_1_second"))


@needs_mirror
def test_judge_check_cli(cache_dir, tiny_model):
    result = run_cli("judge-check", "--model", str(tiny_model), "--limit", "4", cache=cache_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "agreement with GPT-4: " in result.stdout and "pairs: 4 " in result.stdout
    assert "position consistency: " in result.stdout and "win rate of output_2: judge" in result.stdout
    bad = run_cli("judge-check", "--judge", "nope", cache=cache_dir)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "invalid choice: 'nope'" in bad.stderr


@needs_mirror
def test_judge_check_cli_with_the_api_judge(cache_dir, openai_server, monkeypatch):
    monkeypatch.setenv("WIN_RATE_TEST_KEY", "not-a-secret")  # the CLI's environment is a copy of this one
    result = run_cli("judge-check", "--judge", "openai_api", "--model", "smollm2-judge", "--base-url", openai_server,
                     "--api-key-env", "WIN_RATE_TEST_KEY", "--limit", "1", "--max-output-chars", "300", cache=cache_dir,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "judge: openai_api smollm2-judge" in result.stdout and "agreement with GPT-4: " in result.stdout


@needs_mirror
def test_read_gpt4_annotations_interleaves_files():
    rows = read_gpt4_annotations(DATA_MIRROR, 4)
    assert [(r["source"], r["index"]) for r in rows] == [("alpaca-7b.json", 0), ("alpaca-farm-ppo-human.json", 0),
                                                         ("alpaca-7b.json", 1), ("alpaca-farm-ppo-human.json", 1)]
