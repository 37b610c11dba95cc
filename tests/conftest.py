"""Shared fixtures. Nothing here touches the network (HF_HUB_OFFLINE=1 is set for every test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_MIRROR = Path(os.environ.get("ALIGN_HARNESS_DATA", REPO.parent / "shared" / "data")).resolve()
MODELS_CACHE = Path(os.environ.get("ALIGN_HARNESS_CACHE", "~/.cache/alignment-harness")).expanduser() / "models"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 (the README's test command) on 2 cores: one torch thread per worker and per CLI run it starts,
    # read by torch when it loads; two threads each on cores the other worker keeps busy run several times slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh cache per test session whose ``models/`` (unpacked embedded + tiny models) is shared,
    so the 20-second GGUF de-quantization happens once per machine, not once per session."""
    cache = tmp_path_factory.mktemp("cache")
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(MODELS_CACHE, target_is_directory=True)
    return cache


@pytest.fixture
def own_cache(tmp_path_factory) -> Path:
    """A cache of the test's own (``models/`` shared as in ``cache_dir``): for tests that must see a stage trained,
    whatever other tests of the session left in ``cache_dir``."""
    cache = tmp_path_factory.mktemp("own-cache")
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(MODELS_CACHE, target_is_directory=True)
    return cache


@pytest.fixture(scope="session")
def gemma_model(cache_dir) -> Path:
    """The embedded google/gemma-3-270m (``embedded:gemma3-270m``), de-quantized once per machine into the shared
    ``models/`` (~3 min the first time, on an idle machine); for tests marked slow."""
    from harness.inputs.models import materialize_embedded

    return materialize_embedded("gemma3-270m", cache_dir)


def cache_entries(folder: Path) -> list[Path]:
    """A cache folder's entries without the bookkeeping of ``harness.inputs.cache.build_once`` (its lock files and
    ``builds.jsonl``)."""
    return [p for p in Path(folder).iterdir() if p.name != "builds.jsonl" and not p.name.endswith(".lock")]


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    from harness.inputs.models import materialize_tiny_random

    return materialize_tiny_random(0, cache_dir)


def run_cli(*arguments: str, cache: Path, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    """Run the real ``align-harness`` entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *arguments], cwd=REPO, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout, **popen)


def run_cli_forked(*arguments: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``harness.cli.main(arguments)`` in a forked child of this process, with ``run_cli``'s environment, working
    folder, exit status and captured output: the same entry point without paying the libraries' import time again
    (for refusals, which end before any model work)."""
    import signal
    import tempfile
    import time

    import harness.cli
    import harness.report.leaderboard  # noqa: F401  (everything the CLI imports, before the fork: the child starts warm)
    import harness.run.sweep  # noqa: F401
    import hydra  # noqa: F401
    import transformers  # noqa: F401

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: the CLI as a process of its own
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                os.chdir(REPO)
                os.environ.clear()
                os.environ.update(cli_env(cache))
                sys.argv = ["align-harness", *arguments]
                harness.cli.main(list(arguments))
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported like the interpreter would
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(arguments, timeout)
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(list(arguments), os.waitstatus_to_exitcode(status),
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def cli_env(cache: Path) -> dict:
    return {**os.environ, "ALIGN_HARNESS_CACHE": str(cache), "ALIGN_HARNESS_DATA": str(DATA_MIRROR),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (the real embedded model)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def varied_tiny_model(tmp_path_factory, tiny_model) -> Path:
    """A 2-layer random Llama (SmolLM2 tokenizer and chat template) whose greedy outputs vary with the input.

    ``tiny_model`` (small init, tied embeddings) greedily repeats the prompt's last token, so every row of a
    batch gets the same text and a batch-size invariance test would pass vacuously; untied embeddings drawn
    with std 0.5 give different text per prompt.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("varied-tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_micro_batch_step(trainer) -> tuple:
    """One training micro-batch of a TRL ``trainer`` in fp32: ``(batch, loss, {parameter: gradient})`` after
    ``compute_loss`` and ``backward`` (no optimizer step)."""
    trainer.model.float()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return batch, loss.detach(), grads


def assert_same_loss_and_gradients(slow: tuple, fast: tuple) -> None:
    """Two ``one_micro_batch_step`` results agree up to float rounding, on a non-empty set of gradients."""
    import torch

    (_, slow_loss, slow_grads), (_, fast_loss, fast_grads) = slow, fast
    assert slow_grads.keys() == fast_grads.keys() and slow_grads
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-5, atol=1e-6)
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)
