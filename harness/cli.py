"""``align-harness``: the command line.

    align-harness sweep [hydra overrides...]      train, score, write records and the leaderboard
    align-harness plan [--json] [hydra overrides...]  price the sweep: every unit, cache status, FLOPs, device-hours
    align-harness leaderboard results/<sweep>     rebuild the leaderboard from records alone
    align-harness leaderboard A B --into C        merge results folders from several machines, then rebuild
    align-harness judge-check [--judge TYPE]      agreement of the win-rate judge with GPT-4's annotations
    align-harness describe method|task NAME       every parameter of a method or task: default and one-line help

Bad input ends with one line ``align-harness: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

USAGE = __doc__


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "lm-eval", "lm_eval", "accelerate", "trl", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _fail(message: str) -> None:
    print(f"align-harness: error: {message}", file=sys.stderr)
    sys.exit(2)


def sweep_main(argv: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from harness.errors import HarnessError
    from harness.run.registry import CONF_DIR

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sweep")
    def sweep(cfg: DictConfig) -> None:
        from harness.run.sweep import run_sweep

        _quiet_libraries()
        logging.getLogger("harness").setLevel(logging.INFO)
        try:
            leaderboard = run_sweep(cfg)
        except HarnessError as error:
            if cfg.get("unit"):  # a fanned-out job: its parent reports it (harness.run.fanout)
                raise
            _fail(str(error))
        if leaderboard is not None:
            print(f"leaderboard: {leaderboard}", flush=True)

    try:
        check_override_syntax(argv)
        argv = with_plugins(expand_shorthands(argv))
        check_group_choices(argv)
        argv = with_fanout(argv, check_composes(argv))
    except HarnessError as error:
        _fail(str(error))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # hydra/launcher=ray: no usage report (offline machines)
    sys.argv = ["align-harness sweep", *argv]
    sweep()


def with_fanout(argv: list[str], configs: list) -> list[str]:
    """``fanout=true`` in any composed config: run as a Hydra multirun whose sweeper launches one job per unit
    (``hydra/sweeper=harness_units``, ``harness.run.fanout``) through the chosen ``hydra/launcher``."""
    from harness.errors import HarnessError

    if not any(cfg.get("fanout") and not cfg.get("unit") for cfg in configs):
        return argv
    if any(argument.split("=")[0].lstrip("+~") == "hydra/sweeper" for argument in argv):
        raise HarnessError("fanout=true chooses its own sweeper (hydra/sweeper=harness_units); drop hydra/sweeper=")
    multirun = [] if any(argument in ("-m", "--multirun") for argument in argv) else ["-m"]
    return [*multirun, *argv, "hydra/sweeper=harness_units"]

def plan_main(argv: list[str]) -> None:
    """``align-harness plan``: the sweep the same overrides would run, priced (harness.run.pricing); trains, loads and
    writes nothing. ``--json`` = ``plan.format=json``; launcher overrides (``hydra/launcher=...``, ``hydra.launcher.*``)
    are accepted and ignored, so a study's own command line prices it."""
    from harness.errors import HarnessError

    as_json = "--json" in argv
    argv = [argument for argument in argv if argument != "--json"]
    try:
        if any(argument in ("-m", "--multirun") for argument in argv):
            raise HarnessError("plan prices one sweep; drop -m and plan each value of the swept key in turn")
        check_override_syntax(argv)
        argv = [argument for argument in with_plugins(expand_shorthands(argv))
                if not argument.lstrip("+~").startswith(("hydra/launcher", "hydra.launcher", "hydra/sweeper",
                                                          "hydra.sweeper"))]
        check_group_choices(argv)
        check_composes(argv)
        cfg = compose_sweep(argv)
        if as_json:
            cfg.plan.format = "json"
        _quiet_libraries()
        from harness.run.pricing import format_json, format_table, price_sweep

        plan = price_sweep(cfg)
    except HarnessError as error:
        _fail(str(error))
    print(format_json(plan) if cfg.plan.format == "json" else format_table(plan), flush=True)


def compose_sweep(argv: list[str]):
    """conf/sweep.yaml composed with the overrides of ``argv`` (already checked by ``check_composes``)."""
    from hydra import compose, initialize_config_dir

    from harness.run.registry import CONF_DIR

    overrides = [argument for argument in argv if "=" in argument and not argument.startswith("-")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="sweep", overrides=overrides)


LIST_KEYS = ("methods", "tasks", "settings", "plugins")  # list-valued keys of conf/sweep.yaml


def check_override_syntax(argv: list[str]) -> None:
    """Parse every ``key=value`` with Hydra's own grammar first: a malformed one (``methods=[dpo``, ``method=dpo,``)
    or a comma list without ``-m`` (which Hydra would read as a sweep) is refused in one line saying what to write."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from harness.errors import HarnessError

    parser = OverridesParser.create()
    multirun = any(argument in ("-m", "--multirun") for argument in argv)
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        try:
            override = parser.parse_overrides([argument])[0]
        except OverrideParseException as error:
            raise HarnessError(f"argument {argument!r} is not a valid override ({_syntax_problem(value, error)}); "
                               f"{_write_instead(key, value)}") from None
        if key.lstrip("+~") in ("method", "task") and value.startswith("["):
            raise HarnessError(f"argument {argument!r}: {key}= takes one name; {_write_instead(key, value)}")
        if override.is_sweep_override() and not multirun:
            raise HarnessError(f"argument {argument!r} is a comma list, which Hydra sweeps (one run per value) only "
                               f"under -m; {_write_instead(key, value)}, or add -m to sweep")


def _syntax_problem(value: str, error: Exception) -> str:
    if value.count("[") != value.count("]"):
        return "its '[' and ']' do not pair up"
    if value.count("{") != value.count("}"):
        return "its '{' and '}' do not pair up"
    if re.search(r"(^|[,\[])\s*(,|\]|$)", value) and "," in value:
        return "an empty name before or after a ','"
    return str(error).splitlines()[0]


def _write_instead(key: str, value: str) -> str:
    bare = key.lstrip("+~")
    if bare in ("method", "task", *LIST_KEYS):
        names = [name for name in re.split(r"[\[\],\s]+", value) if name]
        listed = bare + "s" if bare in ("method", "task") else bare
        several = f" (several: {listed}=[dpo,kto])" if listed == "methods" and len(names) < 2 else ""
        return f"write {listed}=[{','.join(names)}]{several}"
    return f"write a list as {key}=[a,b], or quote a value holding , [ ] {{ }} or spaces: {key}='{value}'"


def check_composes(argv: list[str]) -> list:
    """Compose the config as Hydra will, so that an unknown key or a broken ``${...}`` is one line, not Hydra's page.
    Under ``-m`` or ``fanout=true`` every job is composed and validated (``Sweep.validate``) here, before Hydra writes
    its sweep folder. Returns the composed configs (none with ``--config-*`` options, which this leaves to Hydra)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.errors import HarnessError
    from harness.run.registry import CONF_DIR

    if any(argument in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
           or argument.startswith("--config-") for argument in argv):
        return []
    multirun = any(argument in ("-m", "--multirun") for argument in argv)
    overrides = [argument for argument in argv if "=" in argument and not argument.startswith("-")]
    jobs = [overrides]
    if multirun:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    configs = []
    for job in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    configs.append(compose(config_name="sweep", overrides=job))
                    OmegaConf.to_container(configs[-1], resolve=True)
        except Exception as error:
            raise HarnessError(_composition_problem(error)) from None
    if multirun or any(cfg.get("fanout") for cfg in configs):
        from harness.run.registry import activate_plugins
        from harness.run.sweep import Sweep

        elsewhere = any(argument.lstrip("+") in REMOTE_LAUNCHERS or argument.startswith("hydra.launcher.ray.init.address=")
                        for argument in argv)
        for cfg in configs:
            activate_plugins(cfg.get("plugins"))
            Sweep(cfg).validate(on_this_machine=not elsewhere)  # jobs on other machines check their own device
    return configs


REMOTE_LAUNCHERS = ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm", "hydra/launcher=ray_cluster")  # jobs elsewhere


def _composition_problem(error: Exception) -> str:
    """Hydra's or OmegaConf's message, which spans lines, as one line with what to do."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unknown = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if unknown:
        key = unknown.group(1)
        return (f"{key} is not a key of the config (a typo?); to add a new key write +{key}=<value>; "
                f"conf/sweep.yaml and conf/<group>/<name>.yaml list the keys")
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    message = "; ".join(line.rstrip(".") for line in lines if not line.startswith(("full_key:", "object_type", "See ")))
    return f"{full_key}: {message}; fix the value of {full_key}" if full_key else f"{message or type(error).__name__}"


def expand_shorthands(argv: list[str]) -> list[str]:
    """``method=dpo`` -> ``methods=[dpo]`` and ``task=gsm8k`` -> ``tasks=[gsm8k]``.

    ``conf/method/`` and ``conf/task/`` are folders of the config tree, so Hydra would read ``method=dpo`` as a
    config-group choice; the shorthand is expanded here instead. Under ``-m``, ``method=dpo,kto`` becomes
    ``methods=[dpo],[kto]``: one sweep per method.
    """
    out = []
    for argument in argv:
        key, sign, value = argument.partition("=")
        if sign and key in ("method", "task") and value and not value.startswith("["):
            argument = f"{key}s=" + ",".join(f"[{name}]" for name in value.split(","))
        out.append(argument)
    return out


def with_plugins(argv: list[str]) -> list[str]:
    """Activate the folders of ``plugins=[...]`` and put their ``conf/`` on Hydra's search path.

    Hydra composes before the sweep runs, so a plugin's config groups (``budget=<a plugin's budget>``) must be on
    ``hydra.searchpath`` already; the folders are read from the command line here. A ``hydra.searchpath`` override
    given too is kept, the plugins' folders after its entries. Under ``-m``, ``plugins=[a],[b]`` searches both.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from harness.run.registry import activate_plugins

    parser = OverridesParser.create()
    folders, searchpath, rest = [], [], []
    for argument in argv:
        override = None
        if "=" in argument and not argument.startswith("-"):
            try:
                override = parser.parse_override(argument)
            except Exception:  # refused before this by check_override_syntax
                pass
        if override is not None and override.key_or_group == "plugins" and not override.is_delete():
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                folders.extend([value] if isinstance(value, str) else value or [])
        if override is not None and override.key_or_group == "hydra.searchpath":
            searchpath.extend(override.value() or [])
            continue
        rest.append(argument)
    plugins = activate_plugins(folders)
    searchpath.extend(f"file://{folder / 'conf'}" for folder in dict.fromkeys(plugins) if (folder / "conf").is_dir())
    if not searchpath:
        return rest
    quoted = ",".join("'" + entry.replace("\\", "\\\\").replace("'", "\\'") + "'" for entry in searchpath)
    return [*rest, f"hydra.searchpath=[{quoted}]"]


def check_group_choices(argv: list[str]) -> None:
    """Name the available options of an unknown config-group choice in one line (before Hydra does, at length)."""
    from harness.errors import HarnessError
    from harness.run.registry import available

    for argument in argv:
        key, _, value = argument.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if group in ("model", "budget", "data", "reward", "feedback") and value and "," not in value:
            if value not in available(group):
                raise HarnessError(f"unknown {group} {value!r} in {argument!r}; available: {', '.join(available(group))}")


def leaderboard_main(argv: list[str]) -> None:
    from harness.errors import HarnessError
    from harness.report.leaderboard import build_leaderboard

    parser = argparse.ArgumentParser(
        prog="align-harness leaderboard",
        description="Rebuild leaderboard .md/.csv/.tex/.html and plots from a folder of records (any machines').")
    parser.error = _fail  # one line, exit 2
    parser.add_argument("folders", nargs="+", metavar="folder",
                        help="a results folder holding records.jsonl, e.g. results/smollm2-135m-smoke; several (copied "
                             "from several machines) are merged into --into")
    parser.add_argument("--into", help="with several folders: the folder to merge them into (records, samples, "
                                       "curves, logs) and build the leaderboard in; may be one of them")
    parser.add_argument("--compare", nargs="*", metavar="VARIANT",
                        help="print paired-bootstrap differences A − B of every metric for each pair of the named "
                             "variants (variant labels or method names) within each family and setting, instead of "
                             "rebuilding; with no names, every pair")
    parser.add_argument("--experiment", help="show the published numbers of conf/experiment/<name>.yaml beside ours")
    arguments = parser.parse_args(argv)
    try:
        arguments.folder = arguments.folders[0]
        if len(arguments.folders) > 1 or arguments.into:
            from harness.records import merge_results

            if not arguments.into:
                raise HarnessError(f"{len(arguments.folders)} folders: name the merged one, e.g. --into "
                                   f"{arguments.folders[0].rstrip('/')}-merged")
            kept = merge_results(arguments.folders, arguments.into)
            print(f"merged {len(arguments.folders)} folders into {arguments.into}: {kept} records", flush=True)
            arguments.folder = arguments.into
        if arguments.experiment:
            write_published(arguments.folder, arguments.experiment)
        if arguments.compare is not None:
            from harness.records import read_records
            from harness.report.leaderboard import Board, compare, compare_text

            if not read_records(arguments.folder):
                raise HarnessError(f"{arguments.folder} holds no records.jsonl (or it is empty); run a sweep into it first")
            print(compare_text(compare(Board(arguments.folder), *arguments.compare)))
            return
        outputs = build_leaderboard(arguments.folder)
    except HarnessError as error:
        _fail(str(error))
    print(outputs["markdown"].read_text())
    for kind, path in outputs.items():
        print(f"{kind}: {path}")


def write_published(folder: str, experiment: str) -> None:
    """Copy an experiment config's published reference numbers beside the records."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from harness.errors import HarnessError
    from harness.inputs.paths import atomic_write_text
    from harness.run.registry import available, group_config

    if experiment not in available("experiment"):
        raise HarnessError(f"unknown experiment {experiment!r}; available: {', '.join(available('experiment'))}")
    from harness.report.published import check_published

    published = check_published(OmegaConf.to_container(group_config("experiment", experiment)).get("published"),
                                f"conf/experiment/{experiment}.yaml")
    if not Path(folder).is_dir():
        raise HarnessError(f"{folder} is not a folder; pass a results folder, e.g. results/<sweep>")
    atomic_write_text(Path(folder) / "published.json", json.dumps(published, indent=1))


def judge_check_main(argv: list[str]) -> None:
    from harness.errors import HarnessError
    from harness.evaluate.judges import JUDGE_TYPES, run_judge_check

    parser = argparse.ArgumentParser(prog="align-harness judge-check",
                                     description="Agreement of the win-rate task's judge (conf/task/win_rate.yaml) "
                                                 "with GPT-4's AlpacaEval annotations in the data mirror.")
    parser.error = _fail  # one line, exit 2
    parser.add_argument("--judge", choices=JUDGE_TYPES, help="judge type (default: judge.type of the task config)")
    parser.add_argument("--limit", type=int, default=32, help="annotated pairs, taken from each file in turn (default 32)")
    parser.add_argument("--model", help="judge.model: local model / reward model folder, or the API's model name")
    parser.add_argument("--base-url", help="judge.base_url of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key-env", help="judge.api_key_env: the environment variable holding the API key")
    parser.add_argument("--max-output-chars", type=int, help="judge.max_output_chars")
    parser.add_argument("--draw-margin", type=float, help="draw when |p - 0.5| <= this (default: the task config's)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass of a local judge")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-mirror", default=os.environ.get("ALIGN_HARNESS_DATA"),
                        help="data mirror folder (default: $ALIGN_HARNESS_DATA)")
    parser.add_argument("--cache", help="harness cache: judge models, and the result kept for the win-rate task's "
                                        "records (default: $ALIGN_HARNESS_CACHE or ~/.cache/alignment-harness)")
    arguments = parser.parse_args(argv)
    _quiet_libraries()
    from harness.inputs.paths import default_cache_dir

    cache_root = Path(arguments.cache).expanduser() if arguments.cache else default_cache_dir()
    overrides = {"model": arguments.model, "base_url": arguments.base_url, "api_key_env": arguments.api_key_env,
                 "max_output_chars": arguments.max_output_chars}
    try:
        from omegaconf import OmegaConf

        from harness.run.registry import group_config

        task_config = OmegaConf.to_container(group_config("task", "win_rate"), resolve=True)
        print(run_judge_check(task_config, judge_type=arguments.judge, limit=arguments.limit, overrides=overrides,
                              draw_margin=arguments.draw_margin, data_mirror=arguments.data_mirror,
                              device=arguments.device, batch_size=arguments.batch_size, cache_root=cache_root),
              flush=True)
    except HarnessError as error:
        _fail(str(error))


def describe_main(argv: list[str]) -> None:
    """Every constructor parameter of a method or task (what its run id or score key hashes), with its default from
    conf/<group>/<name>.yaml and the one-line help written beside it there."""
    from harness.errors import HarnessError
    from harness.run.registry import available, bound_arguments, parameter_help

    parser = argparse.ArgumentParser(prog="align-harness describe", description=describe_main.__doc__)
    parser.error = _fail
    parser.add_argument("group", choices=["method", "task"])
    parser.add_argument("name")
    arguments = parser.parse_args(argv)
    try:
        if arguments.name not in available(arguments.group):
            raise HarnessError(f"unknown {arguments.group} {arguments.name!r}; available: "
                               f"{', '.join(available(arguments.group))}")
        cls, values = bound_arguments(arguments.group, arguments.name, None, params_key=f"{arguments.group}_params")
    except HarnessError as error:
        _fail(str(error))
    helps = parameter_help(arguments.group, arguments.name)
    print(f"{arguments.group} {arguments.name}: {cls.__module__}.{cls.__qualname__}  "
          f"(override: +{arguments.group}_params.{arguments.name}.<key>=<value>)")
    width = max(len(key) for key in values)
    for key, value in values.items():
        if key != "name":
            print(f"  {key:<{width}}  {value!r:<14}  {helps.get(key, '')}")


COMMANDS = {"sweep": sweep_main, "plan": plan_main, "leaderboard": leaderboard_main, "judge-check": judge_check_main,
            "describe": describe_main}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        _fail(f"unknown command {argv[0]!r}; available: {', '.join(COMMANDS)}")
    command(argv[1:])


if __name__ == "__main__":
    main()
