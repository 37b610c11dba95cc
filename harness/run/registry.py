"""Config groups are the registry: ``conf/method/<name>.yaml`` names ``methods/<name>.py``'s class,
``conf/task/<name>.yaml`` names ``tasks/<name>.py``'s. Adding one touches those two files only.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from harness.errors import HarnessError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def available(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def group_config(group: str, name: str, overrides=None):
    """Load ``conf/<group>/<name>.yaml`` merged with ``overrides``; an unknown name lists the known ones."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise HarnessError(f"unknown {group} {name!r}; available: {', '.join(available(group))}")
    config = OmegaConf.load(path)
    if overrides:
        config = OmegaConf.merge(config, overrides)
    return config


RESERVED_KEYS = ("_target_", "tune_grid", "primary_metrics")  # read by the sweep / leaderboard, not constructor arguments


def target_class(group: str, name: str, config):
    """The class a group config's ``_target_`` names."""
    from hydra.utils import get_class

    target = config.get("_target_")
    if not target:
        raise HarnessError(f"{CONF_DIR / group / name}.yaml has no _target_; name the class, e.g. {group}s.{name}.ClassName")
    try:
        return get_class(target)
    except Exception as error:
        raise HarnessError(f"{group} {name!r}: cannot import {target} ({error}); check _target_ in conf/{group}/{name}.yaml") from None


def bound_arguments(group: str, name: str, overrides=None, *, params_key: str) -> tuple[type, dict]:
    """The class and its constructor arguments — the config's keys bound to the signature, defaults filled in.

    The signature is the declaration of a plug-in's parameters (each documented by a comment in its YAML): what is
    bound here is *every* argument, so a run id built from it cannot leave one out. A key the signature does not
    take is refused in one line.
    """
    import inspect

    config = group_config(group, name, overrides)
    cls = target_class(group, name, config)
    arguments = OmegaConf.to_container(config, resolve=True)
    for key in RESERVED_KEYS:
        arguments.pop(key, None)
    signature = inspect.signature(cls)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    declared = [p for p in signature.parameters if signature.parameters[p].kind not in
                (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    unknown = sorted(set(arguments) - set(declared))
    if unknown and not accepts_any:
        raise HarnessError(f"{params_key}.{name}.{unknown[0]} is not a parameter of {group} {name!r}; "
                           f"it takes: {', '.join(p for p in declared if p != 'name')}")
    try:
        bound = signature.bind(**arguments)
    except TypeError as error:
        raise HarnessError(f"{group} {name!r}: {error}; check conf/{group}/{name}.yaml and {params_key}.{name}") from None
    bound.apply_defaults()
    return cls, dict(bound.arguments)


def build(group: str, name: str, overrides=None, *, params_key: str) -> tuple[object, dict]:
    """The object a group config's ``_target_`` names, built from the config's other keys, and those arguments
    bound with every default (what a run spec records)."""
    cls, arguments = bound_arguments(group, name, overrides, params_key=params_key)
    try:
        return cls(**arguments), arguments
    except TypeError as error:
        raise HarnessError(f"{group} {name!r}: {error}; check conf/{group}/{name}.yaml and {params_key}.{name}") from None


def instantiate(group: str, name: str, overrides=None, *, params_key: str):
    """Build the object a group config's ``_target_`` names, with the config's other keys as arguments."""
    return build(group, name, overrides, params_key=params_key)[0]


def parameter_help(group: str, name: str) -> dict[str, str]:
    """Each top-level key's one-line help: the comment after it in ``conf/<group>/<name>.yaml``."""
    import re

    path = CONF_DIR / group / f"{name}.yaml"
    helps: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):[^#]*#\s*(.+)$", line)
        if match:
            helps[match.group(1)] = match.group(2).strip()
    return helps
