"""Preference data: load, normalize to one schema, split, and derive the views methods train on.

Normalized schema (one row per human preference pair)::

    {"prompt": [{"role": "user"|"assistant"|"system", "content": str}, ...],  # ends with a user turn
     "chosen": str, "rejected": str,                                            # the two last assistant turns
     "source_row": int}                                                          # 1-based line in the source

Views (``view_rows``):

* ``pairs``    — the rows as they are (DPO and its variants, CPO, ORPO, SimPO, IPO, ...);
* ``unpaired`` — each pair becomes two examples ``{"prompt", "completion", "label"}``: chosen
  desirable, rejected undesirable (KTO-like methods). One pair = two examples, so matched budgets
  count an unpaired example as half a pair;
* ``sft``      — ``{"prompt", "completion"}`` from the chosen side (the SFT stage).

**Binary feedback** (``format: binary`` or ``toy-binary``): data sets that are natively unpaired —
one completion per row with a thumbs-up / thumbs-down, TRL's unpaired-preference format (e.g.
``trl-lib/kto-mix-14k``)::

    {"prompt": [...messages...], "completion": str, "label": bool, "source_row": int}

They have no pairs: the ``unpaired`` view is the rows themselves, ``sft`` takes the desirable ones,
and ``pairs`` is refused (``view_rows``). Budgets stay counted in pairs, an unpaired example being
half a pair as everywhere: ``budget.pairs`` = P trains on the first 2·P examples of the train split
(``budget_rows``), so KTO takes the same optimizer steps on P "pairs" of binary feedback as on P
preference pairs. The held-out split is ``heldout_examples`` rows (``split_data``).

**Converters** (``FORMATS``): ``hh`` (HH-RLHF transcripts), ``pairs`` (prompt + chosen / rejected, as text or
messages: UltraFeedback binarized, the Tülu 3 mixture), ``saferlhf-better`` / ``saferlhf-safer`` (PKU-SafeRLHF's
two responses and its helpfulness or harmlessness label), ``binary``.

**Lists** (``format: list`` or ``toy-list``): K ranked responses per prompt, the listwise methods' data (LiPO, RRHF,
PRO)::

    {"prompt": [...messages...], "responses": [str, ...], "scores": [float, ...], "source_row": int}

``scores`` are higher-is-better; a row may give ``ranks`` instead (1 = best), stored as scores −rank. Every row
of a list data set has the same K ≥ 2 (the run trains lists of one size). The ``lists`` view of such rows is the
rows themselves; of preference pairs it is each pair as a list of K = 2 (chosen scored 1, rejected 0), so every
list method also runs on pair data. **A list of K counts as K − 1 pairs** (the K − 1 adjacent comparisons that fix
its order; a pair is a list of two): ``budget.pairs`` = P trains on the first max(1, P // (K − 1)) lists
(``budget_rows``), and an optimizer batch of ``budget.batch_pairs`` pairs holds batch_pairs // (K − 1) lists
(``harness.train.plan``) — exact when K − 1 divides both, as it does for pairs (K = 2). Pair methods are refused
on list data (``view_rows``); the held-out task scores each held-out list's best response against its worst
(``heldout_pairs_of``).

Data sets are declared in ``conf/data/<name>.yaml``. They load from their hub id by default and
from a local mirror folder when ``data_mirror`` (or ``ALIGN_HARNESS_DATA``) is set.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import zlib
from pathlib import Path
from typing import Iterable

from harness.checks import check_choice, check_int, check_str
from harness.errors import HarnessError

VIEWS = ("pairs", "unpaired", "sft", "lists")


class DataUnavailable(HarnessError):
    """The data set's rows cannot be read on this machine (no mirror file, the hub unreachable) — not bad rows."""

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict]:
    """Split an Anthropic-HH transcript (``\\n\\nHuman: ... \\n\\nAssistant: ...``) into chat messages."""
    pieces = _TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise ValueError("does not start with '\\n\\nHuman: '")
    messages = []
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def normalize_hh_row(row: dict, *, where: str) -> dict | None:
    """One HH pair → normalized row. Raises HarnessError naming ``where`` and the field when malformed.

    Returns None for a pair whose two dialogues differ before the last assistant turn (5 of the
    2,312 harmless-base test pairs): such a row is not a preference between two completions of
    one prompt, so it is dropped and counted, not trained on.
    """
    sides = {}
    for field in ("chosen", "rejected"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise HarnessError(f"{where}: field {field!r} is missing or not a non-empty string; fix or remove the row")
        try:
            messages = parse_hh_dialogue(value)
        except ValueError as error:
            raise HarnessError(f"{where}: field {field!r} {error}; fix or remove the row") from None
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise HarnessError(f"{where}: field {field!r} does not end with an Assistant turn; fix or remove the row")
        sides[field] = messages
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        return None
    return {
        "prompt": sides["chosen"][:-1],
        "chosen": sides["chosen"][-1]["content"],
        "rejected": sides["rejected"][-1]["content"],
    }


def prompt_messages(row: dict, *, where: str) -> list[dict]:
    """A row's ``prompt``, a string or chat messages, as a list of ``{role, content}`` messages."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant", "system")
        for m in prompt
    ):
        raise HarnessError(f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages")
    return prompt


def normalize_pair_row(row: dict, *, where: str) -> dict | None:
    """A row already in the normalized layout (``prompt`` as str or messages, ``chosen``, ``rejected``)."""
    prompt = prompt_messages(row, where=where)
    out = {"prompt": prompt}
    for field in ("chosen", "rejected"):
        value = row.get(field)
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1].get("content")
        if not isinstance(value, str) or not value.strip():
            raise HarnessError(f"{where}: field {field!r} is missing or not a non-empty string; fix or remove the row")
        out[field] = value
    return out


def normalize_binary_row(row: dict, *, where: str) -> dict:
    """One binary-feedback row ``{prompt, completion, label}`` (TRL's unpaired-preference format: ``prompt`` and
    ``completion`` as text or chat messages, ``label`` a JSON boolean) → normalized. A bad row names ``where``
    and the field."""
    prompt = prompt_messages(row, where=where)
    completion = row.get("completion")
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")
    if not isinstance(completion, str) or not completion.strip():
        raise HarnessError(f"{where}: field 'completion' is missing or not a non-empty string; fix or remove the row")
    label = row.get("label")
    if not isinstance(label, bool):
        raise HarnessError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": prompt, "completion": completion, "label": label}


def saferlhf_row(preference: str):
    """PKU-SafeRLHF rows (Ji et al. 2024; the data set card's fields ``prompt``, ``response_0``, ``response_1``,
    ``better_response_id``, ``safer_response_id``) → normalized pairs, the chosen side by ``preference``:
    ``better_response_id`` (helpfulness) or ``safer_response_id`` (harmlessness). A row whose two responses are the
    same text is not a preference and is dropped."""
    def normalize(row: dict, *, where: str) -> dict | None:
        prompt = prompt_messages(row, where=where)
        responses = []
        for field in ("response_0", "response_1"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise HarnessError(f"{where}: field {field!r} is missing or not a non-empty string; fix or remove the row")
            responses.append(value)
        choice = row.get(preference)
        if isinstance(choice, bool) or choice not in (0, 1):
            raise HarnessError(f"{where}: field {preference!r} must be 0 or 1 (got {choice!r}); fix or remove the row")
        if responses[0] == responses[1]:
            return None
        return {"prompt": prompt, "chosen": responses[choice], "rejected": responses[1 - choice]}

    return normalize


def normalize_list_row(row: dict, *, where: str) -> dict:
    """One listwise row ``{prompt, responses, scores | ranks}`` → normalized ``{prompt, responses, scores}``:
    ``responses`` K ≥ 2 texts (or chat messages, the last turn kept), ``scores`` K numbers (higher better) or
    ``ranks`` K integers (1 = best), stored as scores −rank. A bad row names ``where`` and the field."""
    prompt = prompt_messages(row, where=where)
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise HarnessError(f"{where}: field 'responses' must be a list of at least 2 responses; fix or remove the row")
    texts = []
    for index, value in enumerate(responses):
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1].get("content")
        if not isinstance(value, str) or not value.strip():
            raise HarnessError(f"{where}: field 'responses' item {index} is not a non-empty string; fix or remove the row")
        texts.append(value)
    if "scores" in row:
        field, values = "scores", row["scores"]
        good = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in values)
    elif "ranks" in row:
        field, values = "ranks", row["ranks"]
        good = isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                for v in values)
    else:
        raise HarnessError(f"{where}: field 'scores' (higher better) or 'ranks' (1 = best) is missing; give one per "
                           f"response")
    if not good or len(values) != len(texts):
        kind = "finite numbers" if field == "scores" else "positive integers (1 = best)"
        raise HarnessError(f"{where}: field {field!r} must be {len(texts)} {kind}, one per response; got {values!r}")
    scores = [float(v) for v in values] if field == "scores" else [-float(v) for v in values]
    if len(set(scores)) == 1:
        raise HarnessError(f"{where}: field {field!r} ranks every response the same; no order to learn: fix or remove "
                           f"the row")
    return {"prompt": prompt, "responses": texts, "scores": scores}


FORMATS = {"hh": normalize_hh_row, "pairs": normalize_pair_row, "toy": normalize_pair_row,
           "binary": normalize_binary_row, "toy-binary": normalize_binary_row,
           "list": normalize_list_row, "toy-list": normalize_list_row,
           "saferlhf-better": saferlhf_row("better_response_id"), "saferlhf-safer": saferlhf_row("safer_response_id")}
BINARY_FORMATS = ("binary", "toy-binary")  # natively unpaired feedback: rows {prompt, completion, label}
LIST_FORMATS = ("list", "toy-list")  # K ranked responses per prompt: rows {prompt, responses, scores}
TOY_FORMATS = ("toy", "toy-binary", "toy-list")
EXAMPLES_PER_PAIR = 2  # an unpaired example counts as half a preference pair (budgets, TrainingOutcome.pairs)

TOY_SUBJECTS = ["the sea", "a lemon", "the sky", "snow", "grass", "coal", "a cherry", "milk", "an orange", "ink",
                "a banana", "the sun", "a plum", "chalk", "moss", "soot"]


def toy_preference_rows(size: int) -> Iterable[tuple[int, dict]]:
    """A learnable synthetic preference set (like lm-eval's DummyLM: the pipeline without real data).

    Every prompt asks for a polite answer; the chosen completion is always "Certainly, happy to help."
    and the rejected one "No." — a tiny model learns the preference within a few steps, so tests can
    assert that loss falls and held-out preference accuracy rises.
    """
    for index in range(size):
        subject = TOY_SUBJECTS[index % len(TOY_SUBJECTS)]
        yield index + 1, {"prompt": f"Request {index}: please describe {subject}.",
                          "chosen": "Certainly, happy to help.", "rejected": "No."}


def toy_binary_feedback_rows(size: int) -> Iterable[tuple[int, dict]]:
    """A learnable synthetic binary-feedback set, natively unpaired: one completion per prompt, no prompt twice.

    Every third row is desirable ("Certainly, happy to help."), the others undesirable ("No."): one desirable
    per two undesirable examples, so KTO's class weights must correct the imbalance (λ_D = 2 at λ_U = 1).
    """
    for index in range(size):
        subject = TOY_SUBJECTS[index % len(TOY_SUBJECTS)]
        desirable = index % 3 == 0
        yield index + 1, {"prompt": f"Request {index}: please describe {subject}.",
                          "completion": "Certainly, happy to help." if desirable else "No.", "label": desirable}


TOY_LIST_RESPONSES = ("Certainly, happy to help.", "Sure, I can help.", "Maybe later.", "No.")  # best → worst


def toy_list_rows(size: int) -> Iterable[tuple[int, dict]]:
    """A learnable synthetic listwise set: every prompt has the four ``TOY_LIST_RESPONSES`` scored 3, 2, 1, 0 (helpful
    → curt), presented in an order rotating with the row so that position says nothing about rank."""
    for index in range(size):
        subject = TOY_SUBJECTS[index % len(TOY_SUBJECTS)]
        order = [(index + k) % len(TOY_LIST_RESPONSES) for k in range(len(TOY_LIST_RESPONSES))]
        yield index + 1, {"prompt": f"Request {index}: please describe {subject}.",
                          "responses": [TOY_LIST_RESPONSES[k] for k in order],
                          "scores": [float(len(TOY_LIST_RESPONSES) - 1 - k) for k in order]}


def read_json_lines(path: Path) -> Iterable[tuple[int, dict]]:
    """Yield (line number, object) from a .jsonl or .jsonl.gz file; a file or line that cannot be read (missing,
    not gzip, cut short, not UTF-8, not JSON) names the file and line."""
    try:
        handle = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except FileNotFoundError:
        raise DataUnavailable(f"data file {path} does not exist; set data_mirror=<folder> (or ALIGN_HARNESS_DATA)") from None
    except OSError as error:
        raise HarnessError(f"data file {path} cannot be opened ({error.strerror}); check data_mirror and "
                           f"data.mirror_file") from None
    number = 0
    with handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except gzip.BadGzipFile:
                raise HarnessError(f"{path}: not a gzip file although named .gz; compress it (gzip) or drop the .gz "
                                   f"from its name and from data.mirror_file") from None
            except (EOFError, zlib.error):
                raise HarnessError(f"{path}:{number + 1}: the gzip data ends early or is corrupt (a truncated "
                                   f"download?); fetch the file again") from None
            except OSError as error:
                raise HarnessError(f"{path}:{number + 1}: cannot be read ({error}); fetch the file again") from None
            number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise HarnessError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                   f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise HarnessError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
            if not isinstance(value, dict):
                raise HarnessError(f"{path}:{number}: expected a JSON object per line; fix or remove the line")
            yield number, value


def check_data_config(data_cfg) -> None:
    """The data set config's fields, before any file is read: one line naming ``data.<field>``."""
    check_str("data.name", data_cfg.get("name"))
    check_choice("data.format", data_cfg.get("format"), FORMATS)
    if data_cfg.format in TOY_FORMATS:
        check_int("data.size", data_cfg.get("size"), minimum=1)
    held_out = "heldout_examples" if data_cfg.format in BINARY_FORMATS else "heldout_pairs"
    if data_cfg.get(held_out) is None:
        raise HarnessError(f"data set {data_cfg.name} sets no data.{held_out}; set data.{held_out}=<held-out "
                           f"{held_out.split('_')[1]}> in conf/data/{data_cfg.name}.yaml")
    check_int(f"data.{held_out}", data_cfg.get(held_out), minimum=0)
    check_int("data.split_seed", data_cfg.get("split_seed"), minimum=0)


def load_preference_rows(data_cfg, data_mirror: str | Path | None) -> tuple[list[dict], dict]:
    """Load and normalize every pair of a data set. Returns (rows, provenance)."""
    check_data_config(data_cfg)
    normalize = FORMATS[data_cfg.format]
    rows, dropped = [], 0
    if data_cfg.format in TOY_FORMATS:
        source = data_cfg.format
        toys = {"toy": toy_preference_rows, "toy-binary": toy_binary_feedback_rows, "toy-list": toy_list_rows}
        raw = toys[data_cfg.format](int(data_cfg.size))
    elif data_mirror:
        check_str("data.mirror_file", data_cfg.get("mirror_file"))
        path = Path(data_mirror).expanduser() / data_cfg.mirror_file
        source = str(path)
        raw = read_json_lines(path)
    else:
        source = f"hub:{data_cfg.hub_id}"
        raw = _hub_rows(data_cfg)
    for number, raw_row in raw:
        row = normalize(raw_row, where=f"{source}:{number}")
        if row is not None and "responses" in row and rows and len(row["responses"]) != len(rows[0]["responses"]):
            raise HarnessError(f"{source}:{number}: field 'responses' has {len(row['responses'])} responses, row "
                               f"{rows[0]['source_row']} has {len(rows[0]['responses'])}; every list of a data set "
                               f"must have the same number (cut or drop the others)")
        if row is None:
            dropped += 1
            continue
        row["source_row"] = number
        rows.append(row)
    provenance = {"source": source, "rows": len(rows), "dropped_mismatched_prompts": dropped}
    if is_binary(rows):
        desirable = sum(row["label"] for row in rows)
        provenance.update(feedback="binary", desirable=desirable, undesirable=len(rows) - desirable)
    if is_list(rows):
        provenance.update(feedback="lists", list_size=len(rows[0]["responses"]))
    return rows, provenance


def _hub_rows(data_cfg) -> Iterable[tuple[int, dict]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(data_cfg.hub_id, split=data_cfg.hub_split, **(data_cfg.get("hub_kwargs") or {}))
    except Exception as error:
        raise DataUnavailable(
            f"data set {data_cfg.hub_id} could not be loaded ({type(error).__name__}); offline, set "
            f"data_mirror=<folder holding {data_cfg.mirror_file}> or ALIGN_HARNESS_DATA"
        ) from None
    for number, row in enumerate(dataset, start=1):
        yield number, dict(row)


def split_rows(rows: list[dict], *, heldout: int, seed: int, key: str = "data.heldout_pairs",
               unit: str = "pairs") -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and cut a fixed-size held-out set off the front; the rest is train."""
    check_int(key, heldout, minimum=0)
    if heldout >= len(rows):
        raise HarnessError(f"{key}={heldout} leaves no training {unit} (the data set has {len(rows)}); lower {key}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    return shuffled[heldout:], shuffled[:heldout]


def split_data(rows: list[dict], data_cfg) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of a data set by its fixed ``split_seed``: ``heldout_pairs`` pairs, or for binary
    feedback ``heldout_examples`` examples."""
    if not is_binary(rows):
        return split_rows(rows, heldout=data_cfg.heldout_pairs, seed=data_cfg.split_seed)
    heldout = data_cfg.get("heldout_examples")
    if not isinstance(heldout, int) or heldout < 0:
        raise HarnessError(f"data set {data_cfg.name} is binary feedback: set data.heldout_examples=<held-out "
                           f"examples> in conf/data/{data_cfg.name}.yaml (got {heldout!r})")
    return split_rows(rows, heldout=heldout, seed=data_cfg.split_seed, key="data.heldout_examples", unit="examples")


def is_binary(rows: list[dict]) -> bool:
    """True for binary-feedback rows ``{prompt, completion, label}``, False for preference pairs."""
    return bool(rows) and "label" in rows[0]


def is_list(rows: list[dict]) -> bool:
    """True for list rows ``{prompt, responses, scores}`` (a list data set or the ``lists`` view)."""
    return bool(rows) and "responses" in rows[0]


def pairs_per_list(size: int) -> int:
    """Budget pairs one list of ``size`` responses counts as: K − 1 (see the module docstring)."""
    return max(size - 1, 1)


def lists_for_pairs(pairs: int, size: int) -> int:
    """Lists of ``size`` responses that a budget of ``pairs`` pairs buys: max(1, pairs // (K − 1))."""
    return max(1, pairs // pairs_per_list(size))


def budget_rows(rows: list[dict], pairs: int) -> list[dict]:
    """The rows a budget of ``pairs`` preference pairs trains on: the first ``pairs`` pairs, of binary feedback
    the first ``EXAMPLES_PER_PAIR``·``pairs`` examples (one pair = two unpaired examples), of lists the first
    max(1, pairs // (K − 1)) lists (a list of K = K − 1 pairs; see the module docstring)."""
    if is_binary(rows):
        return rows[: pairs * EXAMPLES_PER_PAIR]
    if is_list(rows):
        return rows[: lists_for_pairs(pairs, len(rows[0]["responses"]))]
    return rows[:pairs]


def pair_count(rows: list[dict]) -> int:
    """How many budget pairs ``rows`` hold (binary feedback: two examples a pair; a list of K: K − 1)."""
    if is_binary(rows):
        return len(rows) // EXAMPLES_PER_PAIR
    if is_list(rows):
        return sum(pairs_per_list(len(row["responses"])) for row in rows)
    return len(rows)


def ranked(row: dict) -> dict:
    """A list row with its responses sorted best first (stable: equal scores keep their order)."""
    order = sorted(range(len(row["scores"])), key=lambda i: -row["scores"][i])
    return {"prompt": row["prompt"], "responses": [row["responses"][i] for i in order],
            "scores": [row["scores"][i] for i in order]}


def heldout_pairs_of(rows: list[dict]) -> list[dict]:
    """Held-out rows as the held-out task's pairs: lists → (best, worst) response pairs; other rows as they are."""
    if not is_list(rows):
        return rows
    out = []
    for row in rows:
        best = ranked(row)
        out.append({**{k: v for k, v in row.items() if k not in ("responses", "scores")},
                    "chosen": best["responses"][0], "rejected": best["responses"][-1]})
    return out


def view_rows(rows: list[dict], view: str) -> list[dict]:
    """Derive the rows of a view (see module docstring) from normalized pairs, binary feedback or lists."""
    if is_list(rows):
        if view == "lists":
            return [ranked(r) for r in rows]
        if view in VIEWS:
            raise HarnessError(f"the data set is listwise (prompt, K ranked responses) and has no {view} view; train a "
                               f"list method (lipo, rrhf, pro) on it, or use a pair data set")
        raise HarnessError(f"unknown data view {view!r}; available: {', '.join(VIEWS)}")
    if is_binary(rows):
        if view == "unpaired":
            return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
        if view == "sft":
            return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["label"]]
        if view == "pairs":
            raise HarnessError("the data set is binary feedback (prompt, completion, label) and has no preference "
                               "pairs; train an unpaired method (kto) on it, or use a pair data set")
        if view == "lists":
            raise HarnessError("the data set is binary feedback (prompt, completion, label) and has no ranked lists; "
                               "train an unpaired method (kto) on it, or use a pair or list data set")
        raise HarnessError(f"unknown data view {view!r}; available: {', '.join(VIEWS)}")
    if view == "pairs":
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    if view == "unpaired":
        out = []
        for r in rows:
            out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        return out
    if view == "sft":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    if view == "lists":  # a pair is a list of K = 2
        return [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]} for r in rows]
    raise HarnessError(f"unknown data view {view!r}; available: {', '.join(VIEWS)}")


def truncate_rows(rows: list[dict], tokenizer, *, max_prompt_tokens: int, max_completion_tokens: int) -> list[dict]:
    """Cut prompts and completions to the budget's token lengths, the same way for every method.

    Prompts lose their oldest turns first, then the oldest tokens of the first remaining turn;
    completions keep their first ``max_completion_tokens`` tokens. Lengths are counted on the
    raw text (the chat template adds a fixed few tokens per turn, allowed for in ``max_length``).
    """

    def head(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else tokenizer.decode(ids[:n])

    def tail(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else tokenizer.decode(ids[-n:])

    def cut_prompt(messages: list[dict]) -> list[dict]:
        lengths = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages]
        start = 0
        while sum(lengths[start:]) > max_prompt_tokens and start < len(messages) - 1:
            start += 1
        kept = [dict(m) for m in messages[start:]]
        while kept and kept[0]["role"] == "assistant":  # a prompt starts with a user turn
            kept.pop(0)
        if not kept:
            kept = [dict(messages[-1])]
        overflow = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in kept)
        if overflow > max_prompt_tokens:
            others = overflow - len(tokenizer(kept[0]["content"], add_special_tokens=False)["input_ids"])
            kept[0]["content"] = tail(kept[0]["content"], max(1, max_prompt_tokens - others))
        return kept

    out = []
    for row in rows:
        new = dict(row)
        new["prompt"] = cut_prompt(row["prompt"])
        for field in ("chosen", "rejected", "completion"):
            if field in row:
                new[field] = head(row[field], max_completion_tokens)
        if "responses" in row:
            new["responses"] = [head(text, max_completion_tokens) for text in row["responses"]]
        out.append(new)
    return out
