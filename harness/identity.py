"""Content hashes: the one way a value (a run spec, a task config, a judge, a data slice) becomes a cache key."""

from __future__ import annotations

import hashlib
import json


def config_hash(value) -> str:
    """A short stable hash of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
