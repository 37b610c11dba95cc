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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh cache per test session whose ``models/`` (unpacked embedded + tiny models) is shared,
    so the 20-second GGUF de-quantization happens once per machine, not once per session."""
    cache = tmp_path_factory.mktemp("cache")
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(MODELS_CACHE, target_is_directory=True)
    return cache


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    from harness.models import materialize_tiny_random

    return materialize_tiny_random(0, cache_dir)


def run_cli(*arguments: str, cache: Path, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    """Run the real ``align-harness`` entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *arguments], cwd=REPO, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout, **popen)


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
