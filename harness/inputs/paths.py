"""Where the harness keeps things on disk.

Defaults (each overridable by config key or environment variable):

* cache (``paths.cache`` / ``ALIGN_HARNESS_CACHE``): ``~/.cache/alignment-harness`` —
  unpacked embedded models, trained checkpoints keyed by run id, converted data files.
* data mirror (``data_mirror`` / ``ALIGN_HARNESS_DATA``): unset = read data sets from
  their hub ids; set to a folder laid out like ``../shared/data`` to read local files.

Every temporary file or folder is named ``.<name>.<pid>.tmp`` (``temporary_path``) beside what it
becomes, so a sweep can tell a dead writer's leftovers from a live one's
(``harness.inputs.cache.remove_stale_temporaries``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from harness import debug


@functools.lru_cache(maxsize=None)
def shipped_config(group: str, name: str) -> dict:
    """The shipped ``conf/<group>/<name>.yaml`` as a plain dict (read once per process); {} for a name with no shipped
    config (a plug-in's) or one that does not parse. For readers below the registry (``harness.report``: labels and
    primary metrics of records written before their task config named them); callers must not modify it."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "conf" / group / f"{name}.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:   # no such file, or not one config: nothing shipped to fall back on
        return {}
    return config if isinstance(config, dict) else {}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_HARNESS_CACHE", "~/.cache/alignment-harness")).expanduser()


def temporary_path(path: Path, label: str = "") -> Path:
    """``.<name>[-<label>].<pid>.tmp`` beside ``path``: this process's temporary for it."""
    return path.with_name(f".{path.name}{'-' + label if label else ''}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes, *, point: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one. ``point`` names
    the write for ``debug.kill_at`` (reached with the whole temporary written, before the rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if point:
        debug.reached(point)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, *, point: str | None = None) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), point=point)
