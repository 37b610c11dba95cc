"""Which engine scores and generates: the sweep's ``engine`` key (conf/sweep.yaml).

* ``harness`` (default): lm-eval's tasks through ``harness.evaluate.lm_backend.HarnessLM`` — lm-eval's HF backend
  with this harness's prefix-cached log-likelihood engine and continuous-batching generation engine — on torch,
  CPU or GPU. Log-likelihoods equal lm-eval's HF backend within 1e-4 (fp32); greedy generations match it for
  nearly every item (``bench/speed.py`` reports the share).
* ``hf``: lm-eval's stock ``HFLM`` and plain ``model.generate``: the reference path, kept for parity checks.
* ``vllm`` (CUDA GPUs): lm-eval's ``vllm`` backend for scoring, ``vllm.LLM`` for the tasks' own generations, both
  with vLLM's automatic prefix caching (the few-shot primer and the chat template's system turn are computed once
  and their KV blocks shared), and TRL's ``use_vllm`` (colocated) for the online methods' sampling. vLLM runs its
  own kernels, so its numbers are a different measurement: the engine is part of every score key (the leaderboard
  never ranks a vLLM score against a torch one), and of an online method's run spec.

The vLLM functions import ``vllm`` lazily; ``check_engine`` refuses ``engine=vllm`` in one line when the package or a
CUDA device is missing, before the sweep writes anything.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from harness.errors import HarnessError

ENGINES = ("harness", "hf", "vllm")
DEFAULT_ENGINE = "harness"
VLLM_INSTALL = "pip install vllm==0.33.*"  # the registries' GPU build; it pulls a CUDA torch


def check_engine(engine: str, device: str | None = None) -> None:
    """``engine`` is one of ENGINES; with the sweep's resolved ``device``, ``vllm`` also needs a CUDA device and the
    package (without one, only the name is checked)."""
    if engine not in ENGINES:
        raise HarnessError(f"engine={engine!r} is not an engine; write engine=harness (default), hf or vllm")
    if engine != "vllm" or device is None:
        return
    if not str(device).startswith("cuda"):
        raise HarnessError(f"engine=vllm runs on CUDA GPUs only and this sweep's device is {device}; "
                           f"write engine=harness (torch, any device) or run on a GPU machine")
    if find_spec("vllm") is None:
        raise HarnessError(f"engine=vllm: the vllm package is not installed; {VLLM_INSTALL}, or write engine=harness")


def vllm_lm_eval_model(path: Path, *, batch_size: int | str = "auto", dtype: str = "auto", seed: int = 1234,
                       gpu_memory_utilization: float = 0.8):
    """lm-eval's registered ``vllm`` backend (looked up by name: its module imports vllm) on ``path`` with automatic prefix caching (vLLM's
    ``enable_prefix_caching``: KV blocks of a shared prompt prefix are computed once and reused)."""
    from lm_eval.api.registry import get_model

    return get_model("vllm")(pretrained=str(path), dtype=dtype, batch_size=batch_size, seed=seed,
                enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization)


def load_vllm(path: Path, *, seed: int = 0, gpu_memory_utilization: float = 0.8):
    """``vllm.LLM`` on the checkpoint at ``path`` with automatic prefix caching."""
    from vllm import LLM

    return LLM(model=str(path), enable_prefix_caching=True, seed=seed, gpu_memory_utilization=gpu_memory_utilization)


def vllm_generate(path: Path, prompts: list[str], *, max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, seed: int = 0, stop: list[str] | None = None,
                  llm=None) -> list[str]:
    """Continuations of ``prompts`` by ``vllm.LLM`` (continuous batching and automatic prefix caching are vLLM's),
    in input order, cut at the first ``stop`` string — the contract of ``harness.evaluate.generation.generate``.
    Greedy is temperature 0; sampling draws at ``temperature`` from the ``top_k`` likeliest tokens (None: all),
    seeded per request so a prompt's draw does not depend on its batch. ``llm``: an engine to reuse (``load_vllm``)."""
    from vllm import SamplingParams

    llm = llm if llm is not None else load_vllm(path, seed=seed)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=(top_k or -1) if do_sample else -1, top_p=1.0, seed=seed if do_sample else None,
                            stop=list(stop or []) or None)
    from harness.evaluate.generation import cut_at_stop

    return [cut_at_stop(output.outputs[0].text, stop) for output in llm.generate(prompts, params)]


def trl_sampling_arguments(engine: str, gpu_memory_utilization: float = 0.3) -> dict:
    """Extra TRL config fields for an online method's sampling: TRL's own vLLM integration, colocated with the
    trainer on the same GPU (no separate server), when ``engine=vllm``; nothing otherwise (HF ``generate``)."""
    if engine != "vllm":
        return {}
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": gpu_memory_utilization}


def generator(path: Path, *, engine: str, device: str, batch_size: int):
    """A function ``(prompts, *, max_new_tokens, progress=None, **sampling) -> texts`` generating with the checkpoint
    at ``path`` on the chosen engine, loading it once: ``vllm`` → ``vllm_generate`` on one ``vllm.LLM``; otherwise the
    checkpoint in fp32 on ``device`` through ``harness.evaluate.generation.generate`` (``harness``: the
    continuous-batching engine) or ``generate_static`` (``hf``: HF ``generate`` in static batches, the previous path)
    (``sampling``: do_sample, temperature, top_k, seed, stop)."""
    if engine == "vllm":
        llm = load_vllm(path)

        def run_vllm(prompts: list[str], *, max_new_tokens: int, progress: str | None = None, **sampling) -> list[str]:
            return vllm_generate(path, prompts, max_new_tokens=max_new_tokens, llm=llm, **sampling)
        return run_vllm
    from harness.evaluate.generation import generate, generate_static, load_for_generation

    model, tokenizer = load_for_generation(path, device)
    run = generate if engine == "harness" else generate_static

    def run_torch(prompts: list[str], *, max_new_tokens: int, progress: str | None = None, **sampling) -> list[str]:
        return run(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        device=device, progress=progress, **sampling)
    return run_torch


EVAL_PRECISIONS = ("fp32", "bf16")  # the sweep's eval_precision key (conf/sweep.yaml)


def scoring_precision(precision: str, device: str):
    """The context a task is scored in: ``fp32`` runs the model as loaded (fp32 weights: lm-eval's default), ``bf16``
    runs its matmuls under ``torch.autocast`` in bfloat16 (weights stay fp32; autocast keeps log-softmax and
    reductions in fp32). On a CPU with AMX a 135M-270M model's scoring forward is ~3.7x faster in bf16 (README:
    Scoring precision); log-probs move by ~1e-2, so the precision is part of the score key and the task caches are
    kept apart (``Sweep.task_cache``). The vLLM engine runs its own kernels and ignores it."""
    from contextlib import nullcontext

    if precision == "fp32":
        return nullcontext()
    import torch

    return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16)
