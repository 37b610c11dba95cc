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


def instantiate(group: str, name: str, overrides=None, *, params_key: str):
    """Build the object a group config's ``_target_`` names, with the config's other keys as arguments."""
    from hydra.utils import get_class

    config = group_config(group, name, overrides)
    target = config.get("_target_")
    if not target:
        raise HarnessError(f"{CONF_DIR / group / name}.yaml has no _target_; name the class, e.g. {group}s.{name}.ClassName")
    try:
        cls = get_class(target)
    except Exception as error:
        raise HarnessError(f"{group} {name!r}: cannot import {target} ({error}); check _target_ in conf/{group}/{name}.yaml") from None
    arguments = OmegaConf.to_container(config, resolve=True)
    arguments.pop("_target_")
    arguments.pop("tune_grid", None)        # read by the sweep's tune mode, not a constructor argument
    arguments.pop("primary_metrics", None)  # read by the leaderboard's unified score (from the record)
    try:
        return cls(**arguments)
    except TypeError as error:
        raise HarnessError(f"{group} {name!r}: {error}; check conf/{group}/{name}.yaml and {params_key}.{name}") from None
