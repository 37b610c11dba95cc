"""Config groups are the registry: ``conf/method/<name>.yaml`` names ``methods/<name>.py``'s class,
``conf/task/<name>.yaml`` names ``tasks/<name>.py``'s. Adding one touches those two files only.

Plugin folders (``plugins=[<folder>]``, like lm-eval's ``include_path``) add configs and code from outside the
repository: ``<folder>/conf/<group>/<name>.yaml`` joins the group, ``<folder>/methods/<name>.py`` and
``<folder>/tasks/<name>.py`` import as ``methods.<name>`` and ``tasks.<name>``, and any other package in the
folder imports under its own name. A plugin never replaces a built-in config or module: same names are refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness.checks import check_arguments
from harness.errors import HarnessError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PLUGIN_PACKAGES = ("methods", "tasks")   # packages whose search path a plugin's folder of the same name extends
_plugins: list[Path] = []                # active plugin folders, in the order they were named


def conf_dirs() -> list[Path]:
    """The config trees searched, built-in first: ``conf/`` and each active plugin's ``conf/``."""
    return [CONF_DIR, *(folder / "conf" for folder in _plugins)]


def _config_files(group: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for conf in conf_dirs():
        for path in sorted((conf / group).glob("*.yaml")):
            files.setdefault(path.stem, path)  # activate_plugins refused duplicates, so nothing is hidden here
    return files


def available(group: str) -> list[str]:
    return sorted(_config_files(group))


def group_config(group: str, name: str, overrides=None):
    """Load ``conf/<group>/<name>.yaml`` (built-in or a plugin's) merged with ``overrides``; an unknown name lists
    the known ones."""
    path = _config_files(group).get(name)
    if path is None:
        raise HarnessError(f"unknown {group} {name!r}; available: {', '.join(available(group))}")
    config = OmegaConf.load(path)
    if overrides:
        config = OmegaConf.merge(config, overrides)
    return config


RESERVED_KEYS = ("_target_", "tune_grid", "primary_metrics", "display",  # read by the sweep / leaderboard, not
                 "count_below_baseline_judge")                         # constructor arguments


def target_class(group: str, name: str, config):
    """The class a group config's ``_target_`` names."""
    from hydra.utils import get_class

    source = _config_files(group)[name]
    target = config.get("_target_")
    if not target:
        raise HarnessError(f"{source} has no _target_; name the class, e.g. {group}s.{name}.ClassName")
    try:
        return get_class(target)
    except Exception as error:
        raise HarnessError(f"{group} {name!r}: cannot import {target} ({error}); check _target_ in {source}") from None


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
        raise HarnessError(f"{group} {name!r}: {error}; check {_config_files(group)[name]} and {params_key}.{name}") from None
    bound.apply_defaults()
    return cls, dict(bound.arguments)


def build(group: str, name: str, overrides=None, *, params_key: str) -> tuple[object, dict]:
    """The object a group config's ``_target_`` names, built from the config's other keys, and those arguments
    bound with every default (what a run spec records). Each argument is checked first (``harness.checks``): its
    type by the signature's annotation, its range by its name."""
    cls, arguments = bound_arguments(group, name, overrides, params_key=params_key)
    check_arguments(f"{params_key}.{name}", cls, {k: v for k, v in arguments.items() if k != "name"},
                    what_to_do=f"align-harness describe {group} {name} lists its parameters")
    try:
        return cls(**arguments), arguments
    except TypeError as error:
        raise HarnessError(f"{group} {name!r}: {error}; check {_config_files(group)[name]} and {params_key}.{name}") from None


def instantiate(group: str, name: str, overrides=None, *, params_key: str):
    """Build the object a group config's ``_target_`` names, with the config's other keys as arguments."""
    return build(group, name, overrides, params_key=params_key)[0]


def parameter_help(group: str, name: str) -> dict[str, str]:
    """Each top-level key's one-line help: the comment after it in ``conf/<group>/<name>.yaml``."""
    import re

    path = _config_files(group)[name]
    helps: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):[^#]*#\s*(.+)$", line)
        if match:
            helps[match.group(1)] = match.group(2).strip()
    return helps


def activate_plugins(folders) -> list[Path]:
    """Make each plugin folder's configs and code visible to the registry; returns the resolved folders.

    Idempotent (an active folder is skipped), so the CLI and ``run_sweep`` may both call it. A folder that does not
    exist, holds none of ``conf/``, ``methods/``, ``tasks/``, or has a config or module named like one already
    known is refused in one line.
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    resolved = [Path(str(folder)).expanduser().resolve() for folder in folders or []]
    for folder in resolved:
        if folder in _plugins:
            continue
        _check_plugin(folder)
        for package_name in PLUGIN_PACKAGES:
            if (folder / package_name).is_dir():
                package = importlib.import_module(package_name)
                package.__path__.append(str(folder / package_name))
        sys.path.append(str(folder))  # the plugin's other packages, after everything installed
        _plugins.append(folder)
        importlib.invalidate_caches()
    return resolved


def _check_plugin(folder: Path) -> None:
    where = f"plugins: {folder}"
    if not folder.is_dir():
        raise HarnessError(f"{where} is not a folder; name a folder holding conf/<group>/<name>.yaml, methods/, tasks/")
    if not any((folder / part).is_dir() for part in ("conf", *PLUGIN_PACKAGES)):
        raise HarnessError(f"{where} holds none of conf/, methods/, tasks/; put configs in conf/<group>/<name>.yaml "
                           f"and code in methods/<name>.py or tasks/<name>.py")
    for path in sorted((folder / "conf").rglob("*.yaml")):
        relative = path.relative_to(folder / "conf")
        for conf in conf_dirs():
            if (conf / relative).exists():
                raise HarnessError(f"{where}: conf/{relative} has the name of {conf / relative}; a plugin adds "
                                   f"configs and never replaces one, so rename it")
    for package_name in PLUGIN_PACKAGES:
        if not (folder / package_name).is_dir():
            continue
        package = importlib.import_module(package_name)
        for name in _module_names(folder / package_name, packages_need_init=False):
            if any(_module_names_in(Path(entry), name) for entry in package.__path__):
                raise HarnessError(f"{where}: {package_name}/{name} has the name of the module {package_name}.{name} "
                                   f"already known; rename it (and the _target_ naming it)")
    for name in _module_names(folder, packages_need_init=True):
        if name in ("conf", *PLUGIN_PACKAGES):
            continue
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            raise HarnessError(f"{where}: {name} has the name of an importable module; rename it")


def _module_names(folder: Path, *, packages_need_init: bool) -> list[str]:
    """Python modules and packages directly in ``folder``."""
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix == ".py" and entry.stem != "__init__":
            names.append(entry.stem)
        elif entry.is_dir() and entry.name != "__pycache__" and entry.name.isidentifier() and (
                not packages_need_init or (entry / "__init__.py").exists()):
            names.append(entry.name)
    return names


def _module_names_in(folder: Path, name: str) -> bool:
    return (folder / f"{name}.py").exists() or (folder / name).is_dir()
