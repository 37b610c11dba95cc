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
* anything that is not a local folder (a hub id) goes to ``AutoTokenizer.from_pretrained`` as it is;
* **dataset fingerprints**: ``datasets.Dataset.map`` hashes its function and arguments (dill) to name cache files,
  and TRL's trainers pass the tokenizer there (``fn_kwargs={"processing_class": ...}``, a bound ``tokenize_row``):
  2-3 calls a run. ``datasets`` pickles the whole tokenizer, and a slow-path tokenizer's Python copies of its
  vocabulary and merges (``_vocab``, ``_merges``: Gemma 3's 262k entries) take 5.0 s a hash on one core, against
  0.02 s for SmolLM2's, whose vocabulary lives only in the Rust backend. For a tokenizer this module parsed, those two
  are hashed as the content digest of the files they were parsed from (the same files give the same digest, other
  files another); everything else is hashed as ``datasets`` does. The hook is ``datasets``' reducer registry
  (``datasets.utils._dill.pklregister``, a private name): a ``datasets`` without it hashes the slow way.
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
_parsed_from: dict[int, tuple[object, str]] = {}  # id(shared _vocab) -> (that dict, the files' content digest)


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
        _hash_by_digest(tokenizer, key[0])
    return _own_copy(entry[0], folder)


def clear() -> None:
    """Forget every parsed tokenizer (tests)."""
    _entries.clear()
    _digests.clear()
    _parsed_from.clear()


def _hash_by_digest(tokenizer, digest: str) -> None:
    """Have ``datasets``' fingerprint hash ``tokenizer``'s shared ``_vocab``/``_merges`` as ``digest`` (module doc)."""
    vocab = vars(tokenizer).get("_vocab")
    if not isinstance(vocab, dict):  # a Rust-only tokenizer: datasets hashes it fast already
        return
    try:
        from datasets.utils import _dill
        pklregister, default = _dill.pklregister, _dill._save_transformersPreTrainedTokenizerBase
    except (ImportError, AttributeError):
        return
    _parsed_from[id(vocab)] = (vocab, digest)
    kind = type(tokenizer)
    if getattr(_dill.Pickler.dispatch.get(kind), "harness_digest", False):
        return

    def reduce(pickler, obj):
        known = _parsed_from.get(id(vars(obj).get("_vocab")))
        if known is not None and known[0] is vars(obj).get("_vocab"):
            obj = copy.copy(obj)  # the reducer pickles ``obj.__dict__``: a copy with the two tables as the digest
            for name in SHARED:
                if name in vars(obj):
                    vars(obj)[name] = f"{name} of tokenizer files {known[1]}"
        default(pickler, obj)

    reduce.harness_digest = True
    pklregister(kind)(reduce)


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

