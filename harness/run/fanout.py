"""Fan a sweep out over Hydra's launchers: one job per unit of work, the leaderboard once at the end.

``align-harness sweep fanout=true hydra/launcher=joblib`` (README: Scale-out) runs the sweep as a Hydra multirun
whose sweeper is ``hydra_plugins.harness_fanout.UnitSweeper``; for each sweep it composes (one, or one per value of
the user's own ``-m`` lists) the parent process here

1. validates everything and prepares the results folder (``Sweep.prepare``: nothing is launched on bad input);
2. lists the units (``Sweep.units``) as jobs ``unit=<setting>:<method>`` (``:<seed>`` added when ``seeds`` lists
   several: one job per seed) with the paths pinned absolute (a job may run
   in another folder or on another machine, where ``~`` and ``$ALIGN_HARNESS_*`` differ), in two waves: the starting
   rows of derived settings (their stage, e.g. the SFT that makes ``sft``, trains once, in that job) beside every
   unit of the other settings, then the derived settings' units; reward-model builders first in each
   (``ranked_unit_waves``);
3. hands each wave to the configured launcher (Hydra's ``Launcher.launch``: joblib workers, submitit on SLURM or
   local processes, Ray tasks) and waits for it (a pool that starts jobs in order gets all waves in one launch,
   ``launch_waves``);
4. builds the leaderboard from the records.

A job (``run_unit_job``) validates its config, labels AI feedback if the sweep has any, and runs its one unit
(``Sweep.run_unit``). Stages several jobs need are built once (``harness.inputs.cache.build_once``); records are
appended under a lock (``harness.records.append_record``). A job that dies (killed, preempted, out of time) leaves its
unit unfinished: the same command again skips every finished (run, task) and redoes the rest.

Our own code only where Hydra has no such thing: which jobs a sweep is made of, in which order. Launching, pickling
and waiting are the launchers'.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.errors import HarnessError
from harness.run.spec import START
from harness.run.sweep import Sweep, parse_unit
from harness.train.memory_gate import release_memory

log = logging.getLogger("harness")

PINNED = ("paths.results", "paths.cache", "data_mirror")  # resolved in the parent, passed to every job as values


def task_config(config: DictConfig) -> DictConfig:
    """A job's config as its task function sees it: Hydra's own node removed (as ``hydra.core.utils.run_job`` does)."""
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def unit_waves(sweep: Sweep) -> list[list[str]]:
    """The sweep's units as ``<setting>:<method>[:<seed>]`` in launch waves (``ranked_unit_waves`` without ranks)."""
    return [[unit for _, unit in wave] for wave in ranked_unit_waves(sweep)]


def ranked_unit_waves(sweep: Sweep) -> list[list[tuple[int, str]]]:
    """The sweep's units in launch waves, each unit with the rank that orders it within its wave (run order within a
    rank; several sweeps' waves merge by rank, ``merged_waves``). A wave ends when its last job does; the next needs
    what it built.

    1. Wave one: the starting rows of derived settings, rank 0 (their stage, the SFT that makes ``sft``, trains there,
       once; a derived setting's wave-one job exists even without ``include_start``), and beside them every unit of
       the settings that derive from nothing (``units_in_order``): the other workers run those while the stages
       train, instead of waiting for the slowest stage.
    2. Wave two: the units of the derived settings (``units_in_order``).
    """
    derived = [s for s in sweep.settings if str(sweep.cfg.model.checkpoints.get(s, "")).startswith("derived:")]
    several = len(sweep.seeds) > 1  # one seed: the job key stays <setting>:<method>
    stages = [f"{setting}:{START}" for setting in derived]
    waves = {True: [], False: []}  # derived setting? -> its units (setting, method, job key)
    for setting, method, seed in sweep.units():
        unit = f"{setting}:{method}" + (f":{seed}" if several and seed is not None else "")
        if unit not in stages:
            waves[setting in derived].append((setting, method, unit))
    first = [(0, unit) for unit in stages] + [(rank + 1, unit) for rank, unit in units_in_order(sweep, waves[False])]
    second = units_in_order(sweep, waves[True])
    return [wave for wave in (first, second) if wave]


def units_in_order(sweep: Sweep, units: list[tuple[str, str, str]]) -> list[tuple[int, str]]:
    """``units`` ((setting, method, job key) in run order) in the order free workers get them: rank 0, one unit per
    setting of a method that needs a reward (PPO, RLOO, ...: it builds the setting's reward model, the longest stage,
    while the other workers train: a unit needing a reward still being built waits on its lock, ``build_once``);
    rank 1, the rest in run order, with those settings' other reward-needing units spread evenly through it (long and,
    on a small machine, memory-heavy: spread out, two rarely meet, ``harness.train.memory_gate``, and none is left
    running alone at the end)."""
    builders, rewarded, others, seen = [], [], [], set()
    for setting, method, unit in units:
        if not getattr(sweep.methods.get(method), "needs_reward", False):
            others.append(unit)
        elif setting in seen:
            rewarded.append(unit)
        else:
            seen.add(setting)
            builders.append(unit)
    spread = sorted([((k + 0.5) / len(others), 0, unit) for k, unit in enumerate(others)] +
                    [((k + 0.5) / len(rewarded), 1, unit) for k, unit in enumerate(rewarded)])
    return [(0, unit) for unit in builders] + [(1, unit) for *_, unit in spread]


def merged_waves(sweeps: list["FannedSweep"]) -> list[list[list[str]]]:
    """The jobs of several fanned-out sweeps (one per value of the user's ``-m`` lists), wave by wave, ordered by rank
    across sweeps (every sweep's reward-model builders before any sweep's plain units); within a rank, sweep after
    sweep, the largest model's first (``FannedSweep.weight``), each in run order.

    Largest first is the longest-processing-time rule of list scheduling (Graham 1969, "Bounds on multiprocessing
    timing anomalies"): a wave ends when its last job does, so the short jobs go last, where they fill the workers'
    ends evenly, instead of one long job running alone at the end (mini-study, two workers: a Gemma unit takes 1.5-3
    min, a SmolLM2 unit 45-90 s)."""
    waves = max((len(s.waves) for s in sweeps), default=0)
    merged = []
    for w in range(waves):
        jobs = [(rank, -s.weight, index, order, job) for index, s in enumerate(sweeps) if w < len(s.waves)
                for order, (rank, job) in enumerate(s.waves[w])]
        merged.append([job for *_, job in sorted(jobs, key=lambda j: j[:4])])
    return merged


def pinned_overrides(overrides: list[str], cfg: DictConfig) -> list[str]:
    """``overrides`` with the paths replaced by the parent's resolved, absolute values."""
    values = {"paths.results": str(Path(cfg.paths.results).expanduser().resolve()),
              "paths.cache": str(Path(cfg.paths.cache).expanduser().resolve()),
              "data_mirror": str(Path(cfg.data_mirror).expanduser().resolve()) if cfg.data_mirror else "null"}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PINNED]
    return kept + [f"{key}={_quoted(value)}" for key, value in values.items()]


def _quoted(value: str) -> str:
    if value == "null" or all(c.isalnum() or c in "/._-" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_unit_job(sweep: Sweep) -> None:
    """One fanned-out job: validate, label AI feedback when a method needs it (cached: one job labels), run the unit."""
    setting, method, seed = parse_unit(sweep.cfg.unit)
    sweep.prepare(job=True)
    log.info("unit %s · %s%s (sweep %s → %s)", setting, method, "" if seed is None else f" · seed {seed}",
             sweep.cfg.name, sweep.results)
    if method != START:
        with sweep.heartbeat.stage("labelling training pairs (AI feedback)"):
            sweep.label_feedback()
    for each in [None] if method == START else [seed] if seed is not None else sweep.seeds:  # no seed: every seed
        sweep.run_unit(setting, method, each)
    release_memory()  # the worker process runs the next unit: its heap back to the machine (memory_gate)


class FannedSweep:
    """One composed sweep of a fanned-out multirun: its parent-side ``Sweep`` and its jobs' overrides by wave."""

    def __init__(self, overrides: list[str], config: DictConfig):
        self.cfg = task_config(config)
        self.sweep = Sweep(self.cfg)
        # validation and the results folder, before any job starts; each job checks its own device
        self.sweep.prepare(on_this_machine=not runs_elsewhere(config))
        base = pinned_overrides(list(overrides), self.cfg)
        self.waves = [[(rank, [*base, f"unit={unit}"]) for rank, unit in wave] for wave in ranked_unit_waves(self.sweep)]
        # how long its units take, relatively: the model's parameter count (conf/model/*.yaml ``parameters``), 0
        # when the config has none; orders several sweeps' jobs within a rank (merged_waves)
        self.weight = float(OmegaConf.select(self.cfg, "model.parameters", default=None) or 0)
        log.info("sweep %s fans out: %d units in %d wave(s) → %s", self.cfg.name, sum(map(len, self.waves)),
                 len(self.waves), self.sweep.results)

    def finish(self) -> Path:
        return self.sweep.finish()


def runs_elsewhere(config: DictConfig) -> bool:
    """Whether the configured launcher runs jobs on other machines (SLURM, a Ray cluster's address), so that this
    process need not have their devices (a login node without GPUs)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return target.endswith("SlurmLauncher") or bool(OmegaConf.select(config, "hydra.launcher.ray.init.address",
                                                                     default=None))


IN_ORDER_LAUNCHERS = ("JoblibLauncher", "BasicLauncher")  # this machine's pools: a job starts only when every job
#                                                           before it has started


def launch_waves(launcher, jobs: list[list[list[str]]]) -> None:
    """Launch each wave of job overrides through Hydra's ``launcher`` and wait for it; a job that failed or died ends
    the sweep in one line (HarnessError) naming it and what to do.

    A launcher that starts jobs in order on this machine (joblib workers, the basic launcher) gets every wave in one
    launch, wave after wave: a job of wave two starts only once every job of wave one has, so no worker waits at a
    wave's end for the slowest job of the wave (mini-study: ~1 min of a worker); one that reaches a stage still being
    built waits on its lock (``build_once``) as it would have at the barrier. Others (SLURM arrays, Ray, submitit) may
    start jobs in any order: a job of wave two holding a GPU while it waits for a stage queued behind it could stall
    the sweep, so they launch wave by wave."""
    if type(launcher).__name__ in IN_ORDER_LAUNCHERS:
        jobs = [[job for wave in jobs for job in wave]]
    _launch_each(launcher, jobs)


def _launch_each(launcher, jobs: list[list[list[str]]]) -> None:
    from hydra.core.utils import JobStatus

    index = 0
    for wave in jobs:
        if not wave:
            continue
        try:
            returns = launcher.launch(wave, initial_job_idx=index)
        except Exception as error:  # a worker killed, a job preempted or timed out: the launcher gives up
            raise HarnessError(f"a job of the fanned-out sweep ended without finishing ({type(error).__name__}: "
                               f"{_first_line(error)}); run the same command again: finished units are skipped, "
                               f"the rest redone") from None
        for overrides, result in zip(wave, returns):
            if result.status == JobStatus.FAILED:
                unit = next((o.split("=", 1)[1] for o in overrides if o.startswith("unit=")), "?")
                error = result._return_value
                kind = "" if isinstance(error, HarnessError) else f"{type(error).__name__}: "
                raise HarnessError(f"unit {unit}: {kind}{_first_line(error)}")
        index += len(wave)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fanned(config: DictConfig) -> bool:
    return bool(OmegaConf.select(config, "fanout", default=False)) and not OmegaConf.select(config, "unit", default=None)
