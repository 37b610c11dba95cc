"""harness.inputs.tokenizer_cache: a folder's tokenizer parsed once per process, each caller with its own copy."""

import shutil

import pytest
from transformers import AutoTokenizer

from harness.inputs import tokenizer_cache
from harness.inputs.tokenizer_cache import load_tokenizer, TOKENIZER_FILES


@pytest.fixture
def folder(tmp_path, tiny_model):
    copy = tmp_path / "tok"
    copy.mkdir()
    for name in TOKENIZER_FILES:
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, copy / name)
    tokenizer_cache.clear()
    yield copy
    tokenizer_cache.clear()


def count_parses(monkeypatch) -> list:
    calls = []
    original = AutoTokenizer.from_pretrained

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counted)
    return calls


def test_parsed_once_and_encodes_as_transformers(folder, monkeypatch):
    calls = count_parses(monkeypatch)
    first, second = load_tokenizer(folder), load_tokenizer(folder)
    assert len(calls) == 1
    assert first is not second
    reference = AutoTokenizer.from_pretrained(folder)
    text = "Hello there, how are you?"
    assert first(text)["input_ids"] == second(text)["input_ids"] == reference(text)["input_ids"]
    chat = [{"role": "user", "content": "Hi"}]
    assert first.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)


def test_a_copy_changed_by_its_caller_leaves_the_others(folder):
    first = load_tokenizer(folder)
    first.padding_side = "left"
    first.pad_token = first.eos_token
    first.chat_template = "{{ 'changed' }}"
    second = load_tokenizer(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    assert second.padding_side == reference.padding_side
    assert second.pad_token == reference.pad_token
    assert second.chat_template == reference.chat_template
    batch = second(["a", "a b c d"], padding=True)["input_ids"]
    assert batch == reference(["a", "a b c d"], padding=True)["input_ids"]


def test_same_content_elsewhere_is_a_hit_changed_content_a_new_parse(folder, tmp_path, monkeypatch):
    calls = count_parses(monkeypatch)
    saved = tmp_path / "checkpoint"
    load_tokenizer(folder).save_pretrained(saved)  # a trained checkpoint saves its start's tokenizer
    load_tokenizer(folder)
    assert len(calls) == 1
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    changed = load_tokenizer(folder)
    assert len(calls) == 2
    assert changed.chat_template == "{{ messages[0]['content'] }}"
    assert load_tokenizer(folder, padding_side="left").padding_side == "left"  # keyword arguments: their own entry
    assert len(calls) == 3


def test_a_grown_vocabulary_is_parsed_again(folder, monkeypatch):
    calls = count_parses(monkeypatch)
    grown = load_tokenizer(folder)
    size = len(grown)
    grown.add_tokens(["<brand-new-token>"])  # the Rust backend is shared: the next caller must not see this token
    fresh = load_tokenizer(folder)
    assert len(calls) == 2
    assert len(fresh) == size
    assert "<brand-new-token>" not in fresh.get_vocab()


def test_not_a_folder_goes_to_transformers(monkeypatch, tmp_path):
    calls = count_parses(monkeypatch)
    with pytest.raises(Exception):
        load_tokenizer(tmp_path / "missing")
    assert calls == [tmp_path / "missing"]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the vocabulary table was pickled")


def gemma_like(folder, extra: str = "ab"):
    """A slow-path tokenizer (Python ``_vocab`` and ``_merges`` tables, as Gemma 3's) saved to ``folder``."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "▁": 4, "a": 5, "b": 6, extra: 7}
    GemmaTokenizer(vocab=vocab, merges=[(extra[0], extra[1])]).save_pretrained(folder)
    return folder


def test_dataset_fingerprints_hash_the_vocabulary_tables_as_the_files_digest(tmp_path):
    from datasets.fingerprint import Hasher

    tokenizer_cache.clear()
    first = load_tokenizer(gemma_like(tmp_path / "one"))
    assert isinstance(vars(first).get("_vocab"), dict)  # the slow path this hook is for
    # the shared table must not be pickled: with the hook, hashing never reaches this entry
    vars(first)["_vocab"]["probe"] = Unpicklable()
    digest = Hasher.hash(first)
    second = load_tokenizer(tmp_path / "one")
    assert Hasher.hash(second) == digest  # same files, same settings: same fingerprint
    assert Hasher.hash({"processing_class": second}) == Hasher.hash({"processing_class": first})
    second.padding_side = "left" if first.padding_side == "right" else "right"
    assert Hasher.hash(second) != digest  # a setting outside the tables still counts
    other = load_tokenizer(gemma_like(tmp_path / "two", extra="ba"))
    assert Hasher.hash(other) != digest  # other files: another digest
    # a tokenizer of that class the cache did not parse is hashed as datasets does, tables included
    from transformers import GemmaTokenizer
    outside = GemmaTokenizer.from_pretrained(tmp_path / "one")
    vars(outside)["_vocab"]["probe"] = Unpicklable()
    with pytest.raises(Exception):
        Hasher.hash(outside)
    tokenizer_cache.clear()
