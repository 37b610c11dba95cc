"""Where the harness keeps things on disk.

Defaults (each overridable by config key or environment variable):

* cache (``paths.cache`` / ``ALIGN_HARNESS_CACHE``): ``~/.cache/alignment-harness`` —
  unpacked embedded models, trained checkpoints keyed by run id, converted data files.
* data mirror (``data_mirror`` / ``ALIGN_HARNESS_DATA``): unset = read data sets from
  their hub ids; set to a folder laid out like ``../shared/data`` to read local files.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_HARNESS_CACHE", "~/.cache/alignment-harness")).expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
