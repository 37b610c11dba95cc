"""Published reference numbers: the ``published:`` rows of a ``conf/experiment/<name>.yaml``, checked and shown.

A row is one number a paper reports, transcribed from a source a reader can check (the comment above each block in
the experiment file names it)::

    {paper, table, model, setting, method, task, metric, value}      # value: a number as printed
    {..., value: null, missing: "<why it is not given here>"}        # a number not found in a checkable source

A number is never guessed: where the source could not be read, ``value`` is null and ``missing`` says why; the
leaderboard prints such a cell as "missing". An optional ``note`` carries a caveat (e.g. two versions of a source
disagree). ``check_published`` refuses a malformed row in one line naming the row and field.
"""

from __future__ import annotations

import math

from harness.errors import HarnessError

FIELDS = ("paper", "table", "model", "setting", "method", "task", "metric", "value")  # every row has all of them
OPTIONAL = ("missing", "note")
SETTINGS = ("pretrained", "sft", "instruct")
MISSING = "missing"  # how a null value is printed in every format


def check_published(rows, where: str) -> list[dict]:
    """The rows as plain dicts; a malformed one is refused naming ``where``, its index and the field."""
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise HarnessError(f"{where}: published must be a list of rows {{{', '.join(FIELDS)}}}")
    out = []
    for index, row in enumerate(rows):
        at = f"{where}: published[{index}]"
        if not isinstance(row, dict):
            raise HarnessError(f"{at} is not a mapping; write {{{', '.join(FIELDS)}}}")
        unknown = sorted(set(row) - set(FIELDS) - set(OPTIONAL))
        if unknown:
            raise HarnessError(f"{at}: unknown field {unknown[0]!r}; a row has {', '.join(FIELDS)} "
                               f"(and optionally {', '.join(OPTIONAL)})")
        for key in FIELDS[:-1]:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise HarnessError(f"{at}: field {key!r} must be a non-empty string (got {row.get(key)!r})")
        if row["setting"] not in SETTINGS:
            raise HarnessError(f"{at}: setting {row['setting']!r} is not one of {', '.join(SETTINGS)}")
        value, missing = row.get("value"), row.get("missing")
        if value is None:
            if not isinstance(missing, str) or not missing.strip():
                raise HarnessError(f"{at}: value is null; say why in missing: \"<why the number is not given>\"")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HarnessError(f"{at}: value {value!r} is not a number; transcribe the number as printed, or "
                                   f"write value: null with missing: \"<why>\"")
            if missing is not None:
                raise HarnessError(f"{at}: value {value} and missing {missing!r} both set; keep one")
        if row.get("note") is not None and not isinstance(row["note"], str):
            raise HarnessError(f"{at}: note must be a string")
        out.append(dict(row))
    return out


def published_value(row: dict) -> str:
    """A row's value as printed: the number, or "missing"."""
    value = row.get("value")
    return MISSING if value is None else f"{value:g}"


def published_markdown(published: list[dict]) -> list[str]:
    """The rows as a Markdown table; missing values say so, with their reasons listed below the table."""
    out = ["## Published reference numbers (not measured here)", "",
           "| source | table | model | setting | method | task | metric | value |", "|---|---|---|---|---|---|---|---|"]
    reasons: dict[str, int] = {}
    for row in published:
        value = published_value(row)
        if row.get("value") is None:
            reasons.setdefault(row["missing"], len(reasons) + 1)
            value += f" [{reasons[row['missing']]}]"
        out.append("| " + " | ".join([*(str(row.get(k, "")) for k in FIELDS[:-1]), value]) + " |")
    out.append("")
    if reasons:
        out += [f"- [{number}] missing: {reason}" for reason, number in reasons.items()] + [""]
    return out
