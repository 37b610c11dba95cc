"""``engine=vllm`` reaches every online method's sampling (checked on the CPU, without vllm: what each would hand to
vLLM), and the GPU runs themselves (marked ``gpu``, skipped without a CUDA device and the vllm package).

TRL's online trainers (rloo, grpo, online_dpo) get ``use_vllm=True, vllm_mode="colocate"`` in their configs; the round
loops (iterative_dpo, sppo, self_rewarding) and RSO sample through ``harness.train.rounds.Sampler(engine="vllm")``
(``vllm.LLM``, ``harness.evaluate.engines.generator``); our PPO samples its rollouts through TRL's own colocated engine
(``trl.generation.vllm_generation.VLLMGeneration``), the policy's weights pushed into it before every batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib.util import find_spec

import pytest
import torch

from harness.protocols import TrainingJob
from harness.run import registry
from harness.train.plan import plan_training
from test_accelerate import ROWS, budget

ONLINE = ("ppo", "rloo", "grpo", "online_dpo", "iterative_dpo", "sppo", "rso", "self_rewarding", "nash_md", "dno")
needs_gpu = pytest.mark.skipif(find_spec("vllm") is None or not torch.cuda.is_available(),
                               reason="gpu: needs a CUDA device and the vllm package (pip install vllm==0.33.*)")


class Captured(Exception):
    """Raised by a stand-in at the point where the method hands its sampling to vLLM."""


def vllm_job(tmp_path, start, name: str, **overrides) -> tuple[object, TrainingJob]:
    from transformers import AutoTokenizer

    from harness.train.rewards import build_reward

    method, _ = registry.build("method", name, overrides or None, params_key="method_params")
    plan = plan_training(budget(), method, ROWS, ROWS[:2], AutoTokenizer.from_pretrained(start), world=1)
    reward = build_reward({"kind": "short-answers", "max_chars": 40}, None)
    return method, TrainingJob(start_checkpoint=start, output_dir=tmp_path / "out", plan=plan, seed=0,
                               scratch_dir=tmp_path / "scratch", reward=reward, engine="vllm")


def test_every_online_method_is_listed_and_samples():
    """The list above is every method that samples its own responses (a new online method must join it)."""
    sampling = {name for name in registry.available("method")
                if getattr(registry.instantiate("method", name, None, params_key="method_params"),
                           "prompts_only", False)}
    assert sampling <= set(ONLINE) and {"ppo", "rloo", "grpo", "online_dpo"} <= sampling


@pytest.mark.parametrize("name,trainer", [("rloo", "trl.RLOOTrainer"), ("grpo", "trl.GRPOTrainer"),
                                          ("online_dpo", "trl.experimental.online_dpo.OnlineDPOTrainer")])
def test_trl_online_methods_sample_with_colocated_vllm(tmp_path, tiny_model, monkeypatch, name, trainer):
    def stand_in(*args, **kwargs):
        raise Captured(kwargs["args"])

    module, _, attribute = trainer.rpartition(".")
    monkeypatch.setattr(__import__(module, fromlist=[attribute]), attribute, stand_in)
    method, job = vllm_job(tmp_path, tiny_model, name)
    with pytest.raises(Captured) as captured:
        method.train(job)
    config = captured.value.args[0]
    assert (config.use_vllm, config.vllm_mode, config.vllm_gpu_memory_utilization) == (True, "colocate", 0.3)
    with pytest.raises(Captured) as captured:
        method.train(dataclasses.replace(job, engine="harness"))
    assert captured.value.args[0].use_vllm is False  # the default engine: HF generate


@pytest.mark.parametrize("name", ["iterative_dpo", "sppo", "rso", "self_rewarding", "dno"])
def test_round_methods_sample_through_the_vllm_engine(tmp_path, tiny_model, monkeypatch, name):
    import harness.train.rounds as rounds

    def complete(self, path, prompts, *, seeds=None):
        raise Captured(self.engine)

    monkeypatch.setattr(rounds.Sampler, "complete", complete)  # the first sampling any of them does
    method, job = vllm_job(tmp_path, tiny_model, name, **({"rounds": 1} if name != "rso" else {}))
    with pytest.raises(Captured) as captured:
        method.train(job)
    assert captured.value.args[0] == "vllm"


def test_nash_md_refuses_the_vllm_engine(tmp_path, tiny_model):
    """Nash-MD's mixture samples need the reference's logits at every token: HF generate only, engine=vllm refused."""
    from harness.errors import HarnessError

    method, job = vllm_job(tmp_path, tiny_model, "nash_md")
    with pytest.raises(HarnessError, match="engine=vllm"):
        method.train(job)


def test_the_vllm_sampler_asks_the_generator_for_vllm(monkeypatch, tiny_model):
    """``Sampler(engine="vllm")`` takes its generate function from ``harness.evaluate.engines.generator(engine="vllm")``
    (``vllm_generate`` on one ``vllm.LLM``), seeded per draw."""
    import harness.evaluate.engines as engines
    from harness.train.rounds import Sampler

    seen = []

    def generator(path, *, engine, device, batch_size):
        seen.append(engine)
        return lambda texts, *, max_new_tokens, **sampling: [f"seed {sampling['seed']}" for _ in texts]

    monkeypatch.setattr(engines, "generator", generator)
    plan = plan_training(budget(), registry.instantiate("method", "dpo", None, params_key="method_params"), [], [],
                         None, world=1)
    samples = Sampler(plan, temperature=0.7, engine="vllm").samples(tiny_model, [ROWS[0]["prompt"]], 2, seed=5)
    assert seen == ["vllm"] and samples == [["seed 5", "seed 6"]]


def test_ppo_samples_through_trls_vllm_engine(tmp_path, tiny_model, monkeypatch):
    """PPO with engine=vllm: its rollouts come from the engine (weights pushed before every batch), not HF generate."""
    import methods.ppo as ppo
    from trl.generation.vllm_generation import VLLMGeneration

    method, job = vllm_job(tmp_path, tiny_model, "ppo", ppo_epochs=1)
    arguments = ppo.vllm_sampler_arguments(job, method.temperature)
    inspect.signature(VLLMGeneration).bind(None, None, None, **arguments)  # fields VLLMGeneration takes
    assert (arguments["mode"], arguments["temperature"], arguments["top_k"]) == ("colocate", method.temperature, 0)
    assert arguments["max_completion_length"] == job.budget.max_completion_tokens

    class Engine:
        def __init__(self):
            self.syncs, self.batches = 0, []

        def sync_weights(self):
            self.syncs += 1

        def generate(self, prompts, images, num_generations):
            self.batches.append(len(prompts))
            return prompts, [[42, 43, 44, 2] for _ in prompts], None, None  # three tokens, then EOS (id 2)

    engine = Engine()
    monkeypatch.setattr(ppo, "vllm_sampler", lambda policy, tokenizer, job, temperature: engine)
    monkeypatch.setattr(ppo, "sample_rollout", lambda *a, **k: (_ for _ in ()).throw(AssertionError("HF generate")))
    outcome = method.train(job)
    assert engine.syncs == 2 and engine.batches == [4, 4]  # 8 prompts in batches of budget.batch_pairs
    assert all(entry["completion_tokens"] == 4.0 for entry in outcome.curves)
    assert outcome.optimizer_steps == 2


@pytest.mark.gpu
@needs_gpu
def test_ppo_trains_with_vllm_on_a_gpu(tmp_path, tiny_model):
    method, job = vllm_job(tmp_path, tiny_model, "ppo", ppo_epochs=1)
    outcome = method.train(job)
    assert outcome.optimizer_steps == 2 and outcome.extra["generation_tokens"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
