"""Checks of config values before any work: each failure is one line naming the config key and the rule broken.

The budget (``harness.train.budget``), the data set config (``harness.inputs.data``) and the sweep's own keys
(``harness.run.sweep``) check their fields with the functions here. Every method's and task's constructor
arguments are checked by ``check_arguments``: their types by the signature's annotations, their ranges by the
parameter's name (``PARAMETER_RANGES``; a plug-in whose parameter means something else under a shared name
declares ``parameter_ranges = {"beta": Range(0)}`` on its class).
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError


@dataclass(frozen=True)
class Range:
    """Allowed numbers: ``Range(0, above=True)`` is > 0, ``Range(0, 1, below=True)`` is [0, 1)."""

    minimum: float | None = None
    maximum: float | None = None
    above: bool = False   # strictly above ``minimum``
    below: bool = False   # strictly below ``maximum``

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum):
            return False
        return self.maximum is None or (value < self.maximum if self.below else value <= self.maximum)

    def __str__(self) -> str:
        if self.maximum is None:
            return f"{'>' if self.above else '>='} {self.minimum:g}"
        if self.minimum is None:
            return f"{'<' if self.below else '<='} {self.maximum:g}"
        return f"in {'(' if self.above else '['}{self.minimum:g}, {self.maximum:g}{')' if self.below else ']'}"


POSITIVE = Range(0, above=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, above=True, below=True)

# What a parameter's name means in every method and task here: the range it must lie in.
PARAMETER_RANGES = {
    "learning_rate": POSITIVE, "beta": POSITIVE, "temperature": POSITIVE, "weight_ratio": POSITIVE,
    "rounds": Range(1), "samples": Range(2), "num_generations": Range(2), "num_iterations": Range(1),
    "ppo_epochs": Range(1), "minibatches": Range(1), "chunks": Range(1), "candidates": Range(1), "accepted": Range(1),
    "top_k": Range(1), "max_new_tokens": Range(1), "max_output_chars": Range(1), "per_group": Range(1),
    "limit": Range(1), "num_fewshot": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "label_smoothing": Range(0, 0.5, below=True), "label_noise": Range(0, 0.5, below=True),  # 0.5 = a coin flip
    "draw_margin": Range(0, 0.5, below=True), "threshold": Range(0, 1, below=True), "filter_ratio": Range(0, 1, above=True),
    "momentum": Range(0, 1, below=True), "lam": Range(0, 1), "epsilon": POSITIVE, "clip": POSITIVE,
    "value_clip": POSITIVE, "kl_target": POSITIVE, "kl_horizon": POSITIVE, "margin": NON_NEGATIVE,
    "alpha": NON_NEGATIVE, "lambda_": NON_NEGATIVE, "rejection_beta": NON_NEGATIVE,
}
SUFFIX_RANGES = (("_weight", NON_NEGATIVE), ("_ratio", NON_NEGATIVE), ("_fraction", FRACTION),
                 ("_alpha", NON_NEGATIVE), ("_coef", NON_NEGATIVE))


def check_int(key: str, value, minimum: int | None = None) -> None:
    """A whole number (not a bool, not 4.5, not '4'), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise HarnessError(f"{key}={value!r} must be a whole number" + (f" >= {minimum}" if minimum is not None else ""))


def check_number(key: str, value, allowed: Range | None = None) -> None:
    """A number (an int or a float, not a bool or a string) in ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (allowed is not None and value not in allowed):
        raise HarnessError(f"{key}={value!r} must be a number" + (f" {allowed}" if allowed is not None else ""))


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise HarnessError(f"{key}={value!r} must be true or false")


def check_str(key: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise HarnessError(f"{key}={value!r} must be a non-empty string; quote a value Hydra reads as a number: {key}='1'")


def check_choice(key: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise HarnessError(f"{key}={value!r} is not one of {', '.join(choices)}; choose one")


def check_names(key: str, value, example: str) -> list[str]:
    """A list of names (``methods=[dpo,kto]``), each once; a scalar says how to write the list."""
    if isinstance(value, str):
        raise HarnessError(f"{key}={value} is not a list; write {key}=[{value}]")
    if not isinstance(value, (list, tuple)):
        raise HarnessError(f"{key}={value!r} is not a list of names; write {key}=[{example}]")
    for name in value:
        if not isinstance(name, str) or not name:
            raise HarnessError(f"{key}: {name!r} is not a name; write {key}=[{example}]")
    repeated = sorted({name for name in value if list(value).count(name) > 1})
    if repeated:
        raise HarnessError(f"{key} names {repeated[0]!r} twice; name each once")
    return list(value)


def check_writable_folder(key: str, folder: Path) -> None:
    """``folder`` is a folder or can be made one, and is writable, without making anything: the nearest existing
    path on the way up must be a folder this process may write in."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise HarnessError(f"{key}: {path} is a file, not a folder; point {key} at a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise HarnessError(f"{key}: cannot write in {path} (permission denied); choose a folder you can write in")


def check_arguments(where: str, cls, arguments: dict, *, what_to_do: str) -> None:
    """A plug-in's bound constructor arguments (``where`` = ``method_params.dpo``): each value of the type its
    annotation names and in the range its name implies; ``what_to_do`` ends the message."""
    hints = _type_hints(cls)
    declared = getattr(cls, "parameter_ranges", {})
    for key, value in arguments.items():
        full = f"{where}.{key}"
        if key in hints and not _is_instance(value, hints[key]):
            raise HarnessError(f"{full}={value!r} must be {_describe(hints[key])}; {what_to_do}")
        allowed = declared.get(key) or parameter_range(key)
        if allowed is not None and _is_instance(value, float) and value not in allowed:
            raise HarnessError(f"{full}={value!r} must be {allowed}; {what_to_do}")


def parameter_range(name: str) -> Range | None:
    if name in PARAMETER_RANGES:
        return PARAMETER_RANGES[name]
    return next((allowed for suffix, allowed in SUFFIX_RANGES if name.endswith(suffix)), None)


def _type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve is not checked
        return {}


def _is_instance(value, hint) -> bool:
    """``isinstance`` for the annotations plug-ins use: int, float (an int too), bool, str (a whole number too), dict,
    list[X], X | None."""
    origin, parts = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, part) for part in parts)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:  # Hydra reads version=2 as the number 2: digits pass for a string
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        return isinstance(value, list) and (not parts or all(_is_instance(item, parts[0]) for item in value))
    return True  # Any and anything more elaborate: not checked


def _describe(hint) -> str:
    origin, parts = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        described = [_describe(part) for part in parts if part is not type(None)]
        return " or ".join(described) + (" or null" if type(None) in parts else "")
    if hint is list or origin is list:
        plural = {float: "numbers", int: "whole numbers", bool: "booleans", str: "strings", dict: "mappings"}
        return f"a list of {plural.get(parts[0], str(parts[0]))}" if parts else "a list"
    return {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(origin or hint, str(hint))
