"""The ``engine`` switch (harness.evaluate.engines): refusals, what reaches vLLM and TRL, and the GPU path itself
(marked ``gpu``: skipped without a CUDA device and the vllm package)."""

from __future__ import annotations

import sys
import types
from importlib.util import find_spec

import pytest

from harness.errors import HarnessError
from harness.evaluate import engines
from harness.run.spec import RunSpec

needs_gpu = pytest.mark.skipif(
    find_spec("vllm") is None or not __import__("torch").cuda.is_available(),
    reason="gpu: needs a CUDA device and the vllm package (pip install vllm==0.33.*)")


def test_check_engine_refuses_unknown_engines_and_vllm_without_a_gpu_or_the_package(monkeypatch):
    for engine in ("harness", "hf"):
        engines.check_engine(engine, "cpu")
    with pytest.raises(HarnessError, match="engine='fast' is not an engine"):
        engines.check_engine("fast")
    with pytest.raises(HarnessError, match="runs on CUDA GPUs only and this sweep's device is cpu"):
        engines.check_engine("vllm", "cpu")
    monkeypatch.setattr(engines, "find_spec", lambda name: None)
    with pytest.raises(HarnessError, match=r"vllm package is not installed; pip install vllm"):
        engines.check_engine("vllm", "cuda")
    monkeypatch.setattr(engines, "find_spec", lambda name: object())
    engines.check_engine("vllm", "cuda:0")


class FakeLLM:
    """Records what the harness asks of ``vllm.LLM`` and answers each prompt with a fixed text."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.made.append(kwargs)
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        completion = types.SimpleNamespace(text=" answer STOP and more")
        return [types.SimpleNamespace(outputs=[completion]) for _ in prompts]


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.made = []
    return module


def test_vllm_generation_turns_on_prefix_caching_and_keeps_the_generate_contract(fake_vllm, tmp_path):
    texts = engines.vllm_generate(tmp_path, ["a", "b"], max_new_tokens=7, stop=["STOP"])
    assert texts == [" answer ", " answer "]                       # input order, cut at the first stop string
    assert FakeLLM.made == [{"model": str(tmp_path), "enable_prefix_caching": True, "seed": 0,
                             "gpu_memory_utilization": 0.8}]
    generate = engines.generator(tmp_path, engine="vllm", device="cuda", batch_size=8)
    generate(["x"], max_new_tokens=5)
    sampled = generate(["x"], max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, seed=3)
    assert sampled == [" answer STOP and more"] and len(FakeLLM.made) == 2   # one engine for every call of a generator


def test_vllm_sampling_parameters_greedy_and_seeded(fake_vllm, tmp_path):
    llm = FakeLLM(model="m")
    engines.vllm_generate(tmp_path, ["p"], max_new_tokens=4, llm=llm)
    engines.vllm_generate(tmp_path, ["p"], max_new_tokens=4, do_sample=True, temperature=0.5, top_k=None, seed=9, llm=llm)
    greedy, sampled = (params for _, params in llm.calls)
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 4 and greedy["seed"] is None
    assert sampled["temperature"] == 0.5 and sampled["top_k"] == -1 and sampled["seed"] == 9


def test_lm_eval_vllm_backend_gets_prefix_caching(monkeypatch, tmp_path):
    import lm_eval.api.registry as registry

    seen = {}
    monkeypatch.setattr(registry, "get_model", lambda name: seen.update(name=name) or (lambda **kw: seen.update(kw) or "lm"))
    assert engines.vllm_lm_eval_model(tmp_path) == "lm"
    assert seen["name"] == "vllm" and seen["pretrained"] == str(tmp_path) and seen["enable_prefix_caching"] is True


def test_trl_sampling_arguments_are_fields_of_every_online_trainer_config():
    from trl import GRPOConfig, RLOOConfig
    from trl.experimental.online_dpo import OnlineDPOConfig

    assert engines.trl_sampling_arguments("harness") == {} and engines.trl_sampling_arguments("hf") == {}
    arguments = engines.trl_sampling_arguments("vllm")
    assert arguments["use_vllm"] is True and arguments["vllm_mode"] == "colocate"
    for config in (GRPOConfig, RLOOConfig, OnlineDPOConfig):
        assert set(arguments) <= set(config.__dataclass_fields__), config.__name__


def test_an_online_run_sampled_by_vllm_is_another_run():
    common = dict(family="f", setting="instruct", start={"spec": "s"}, method="grpo", hyperparameters={"beta": 0.0},
                  budget={"pairs": 4}, seed=0, reward={"kind": "rm"})
    torch_run, vllm_run = RunSpec(**common), RunSpec(**common, sampler="vllm")
    assert "sampler" not in torch_run.identity and vllm_run.identity["sampler"] == "vllm"
    assert torch_run.run_id != vllm_run.run_id


@pytest.mark.gpu
@needs_gpu
def test_vllm_engine_scores_and_generates_on_a_gpu(tmp_path, cache_dir):
    from conftest import run_cli
    from harness.records import read_records

    result = run_cli("sweep", "model=tiny-random", "budget=micro", "settings=[instruct]", "methods=[]",
                     "tasks=[truthfulqa_mc,win_rate]", "+task_params.truthfulqa_mc.limit=2",
                     "+task_params.win_rate.limit=2", "engine=vllm", "device=cuda", f"paths.results={tmp_path}",
                     "name=t", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_records(tmp_path / "t" / "records.jsonl")
    assert {r["task"] for r in records if r["status"] == "ok"} == {"truthfulqa_mc", "win_rate"}
