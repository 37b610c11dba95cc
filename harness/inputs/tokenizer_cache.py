"""A checkpoint folder's tokenizer, parsed once per process: ``load_tokenizer(path)``.

``AutoTokenizer.from_pretrained`` parses ``tokenizer.json`` in Python on every call: 0.35 s for SmolLM2's 49k
vocabulary, 2.8-3.5 s for Gemma 3's 262k. A unit of work loads its tokenizer some eight times (the trainer, the
budget plan, the held-out cut, the scorer, lm-eval's wrapper, the chat-template check), ~23 s of a ~100 s Gemma run
(py-spy on a mini-study DPO run). Transformers keeps no such cache, so this module does:

* the key is the content of the folder's tokenizer files (a BLAKE2 digest, itself memoized by each file's size and
  mtime) and the keyword arguments: a trained checkpoint that saved the same tokenizer hits the entry of its start;
  a folder whose files changed is parsed again;
* every call gets its own copy (``copy.copy`` with the Python-level dicts and lists copied too): setting
  ``pad_token``, ``padding_side`` or ``chat_template`` on one leaves the cached one and every other copy as they
  were. The Rust backend is shared; transformers sets its padding and truncation on every call, and a copy that grew
  the vocabulary (``add_tokens``) is noticed by its length and the entry parsed again;
* anything that is not a local folder (a hub id) goes to ``AutoTokenizer.from_pretrained`` as it is.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")
SHARED = ("_vocab", "_merges")  # read-only after loading and large (262k entries): not copied per call

_entries: dict[tuple, tuple[object, int]] = {}
_digests: dict[tuple, str] = {}


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path, **kwargs)``, parsed once per process for a local folder (module doc)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        return AutoTokenizer.from_pretrained(path, **kwargs)
    key = (_content_digest(folder), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    entry = _entries.get(key)
    if entry is None or len(entry[0]) != entry[1]:  # new, or a copy grew the shared backend's vocabulary
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        entry = _entries[key] = (tokenizer, len(tokenizer))
    return _own_copy(entry[0], folder)


def clear() -> None:
    """Forget every parsed tokenizer (tests)."""
    _entries.clear()
    _digests.clear()


def _own_copy(tokenizer, folder: Path):
    mine = copy.copy(tokenizer)
    for name, value in vars(tokenizer).items():
        if name not in SHARED and isinstance(value, (dict, list, set)):
            vars(mine)[name] = copy.copy(value)
    mine.name_or_path = str(folder)
    return mine


def _content_digest(folder: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in TOKENIZER_FILES:
        file = folder / name
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _digests:
            _digests[memo] = _file_digest(file)
        digest.update(f"{name}:{_digests[memo]};".encode())
    return digest.hexdigest()


def _file_digest(file: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

