"""The sweep: train every (setting, method) under one budget, score every checkpoint, write records.

Reads as a checklist (``run_sweep``):

1. validate names, budget and data before any work (bad input stops here, nothing written); then remove the
   temporaries killed writers left in the cache and results (``harness.inputs.cache``);
2. label the training pairs when ``feedback`` names a judge (AI feedback, ``harness.train.feedback``; cached);
   for each starting setting, resolve its checkpoint (a hub id offline → ``skipped`` records;
   a derived setting runs its stage, cached);
3. score the untouched starting checkpoint (the reference row, method ``start``; once, whatever the seeds);
4. for each method and each of ``seeds``: train (cached by run id) and score on every task; a failure is recorded
   and the sweep goes on;
5. rebuild the leaderboard from the records.

Re-running the same command skips every (run, task) that already has an ``ok`` record; cached checkpoints are
reused only when they match their manifest.

**Seeds.** ``seeds`` (conf/sweep.yaml, default ``[${budget.seed}]``: one seed) lists the training seeds; each method
trains once per seed. A seed takes the place of ``budget.seed`` in that run's budget (TrainingJob seed, TRL's
``seed``/``data_seed``: initialisation, data order, sampling of online methods) and in its run spec, so seed 0 of
``seeds=[0,1,2]`` is the very run (same run id, same cached checkpoint) a one-seed sweep trains. Untouched starting
rows are seed-independent (scored once); derived stages and reward models train once under ``stage_budget``'s seed;
tuning trials train under the first seed and the chosen hyperparameters train under every seed. The leaderboard
folds the seeds of a variant into one row (``harness.report.board``).
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.checks import POSITIVE, check_bool, check_choice, check_int, check_names, check_number, check_str, check_writable_folder
from harness.run import registry
from harness.train.budget import Budget, ResourceMeter, training_flops
from harness.inputs.data import (DataUnavailable, heldout_pairs_of, is_binary, is_list, load_preference_rows, pair_count,
                                 split_data)
from harness.errors import HarnessError, SkipRun
from harness.evaluate.engines import EVAL_PRECISIONS, check_engine, scoring_precision
from harness.train.feedback import feedback_from_config
from harness.train.matching import ModelSizes, match_quality
from harness.train.memory_gate import release_memory, training_slot
from harness.train.plan import cut_to_budget, plan_training
from harness.train.rewards import reward_budget
from harness import debug
from harness.inputs.cache import build_once, discard, entry_lock, is_whole, publish, remove_stale_temporaries
from harness.inputs.models import check_checkpoint_spec, resolve_checkpoint
from harness.inputs.paths import atomic_write_text, temporary_path
from harness.protocols import Checkpoint, RewardContext, TaskContext, TrainingJob
from harness.identity import config_hash
from harness.records import append_record, finished_keys, now, versions, write_samples
from harness.run.launch import Launch, check_launch, launch_from_config, train_in_processes
from harness.run.progress import Heartbeat, quiet_progress_bars
from harness.report.published import check_published
from harness.run.spec import START, RunSpec, ScoreKey, differences, shipped_choices, variant_name

log = logging.getLogger("harness")
SETTINGS = ("pretrained", "sft", "instruct")


@dataclass
class StartPoint:
    """A setting's starting checkpoint, or why there is none."""

    setting: str
    identity: dict                       # what the run id hashes: spec, and the stage for derived ones
    path: Path | None = None
    skip_reason: str | None = None
    consumed: dict = field(default_factory=dict)  # a derived stage's own cost


class Sweep:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.results = Path(cfg.paths.results) / cfg.name
        self.cache = Path(cfg.paths.cache).expanduser()
        self.mirror = Path(cfg.data_mirror).expanduser() if cfg.data_mirror else None
        self.method_names = list(cfg.methods)  # the CLI expands method=<name> / task=<name> (harness.cli)
        self.task_names = list(cfg.tasks)
        self.settings = list(cfg.settings)
        self._versions = versions()
        self.heartbeat = Heartbeat(cfg.get("heartbeat_seconds", 30))  # a line at least this often while a stage runs
        self._starts: dict[str, StartPoint] = {}
        self._heldout: dict[str, list[dict]] = {}
        self._tuned: dict[tuple, tuple] = {}  # (setting, method) -> tune()'s choice, made once for every seed
        self.launch = Launch()  # validate reads the launch keys

    # 1. validation ------------------------------------------------------------------------
    def validate(self, *, on_this_machine: bool = True, stand_in_rows=None) -> None:
        """Every input checked before any work: the sweep's own keys and paths, methods and tasks (each argument),
        budgets, the data, the device, the records already in the results folder. Writes nothing. With
        ``on_this_machine=False`` (``align-harness plan`` pricing a run meant for other hardware) the device and the
        engine are checked by name only, not against this machine. ``stand_in_rows(error)`` (the plan's, for a data
        set not found here: ``harness.inputs.data.DataUnavailable``) returns (rows, provenance) to use instead of
        refusing with ``error``; malformed rows are refused either way."""
        cfg = self.cfg
        check_sweep_config(cfg)
        check_published(OmegaConf.to_container(cfg.published) if cfg.get("published") else None, "published")
        self.method_names, self.task_names, self.settings = list(cfg.methods), list(cfg.tasks), list(cfg.settings)
        for setting in self.settings:
            if setting not in SETTINGS:
                raise HarnessError(f"settings: unknown setting {setting!r}; available: {', '.join(SETTINGS)}")
            check_checkpoints(cfg, setting)
        if not self.method_names and not cfg.include_start:
            raise HarnessError("nothing to do: methods is empty and include_start=false")
        self.tasks, self.task_arguments = {}, {}
        for name in self.task_names:
            self.tasks[name], self.task_arguments[name] = registry.build(
                "task", name, cfg.task_params.get(name), params_key="task_params")
        self.task_configs = {name: OmegaConf.to_container(registry.group_config("task", name, cfg.task_params.get(name)))
                             for name in self.task_names}
        self.seeds = [int(seed) for seed in cfg.seeds]  # checked by check_sweep_config
        self.budget = replace(Budget.from_config(cfg.budget), seed=self.seeds[0])  # the first seed's; seed_budget(s)
        self.stage_budget = Budget.from_config(cfg.stage_budget, key="stage_budget")
        self.reward_budget = reward_budget(cfg.reward, self.stage_budget)  # a reward model's: reward.pairs if set
        self.methods, self.method_arguments = {}, {}
        for name in self.method_names:
            self.methods[name], self.method_arguments[name] = registry.build(
                "method", name, method_overrides(self.budget, cfg.method_params.get(name), name), params_key="method_params")
        try:
            rows, self.data_provenance = load_preference_rows(cfg.data, self.mirror)
        except DataUnavailable as error:  # not found here; bad rows are refused whatever the caller
            if stand_in_rows is None:
                raise
            rows, self.data_provenance = stand_in_rows(error)
        self.train_rows, self.heldout_rows = split_data(rows, cfg.data)
        self.budget.check_fits(pair_count(self.train_rows), cfg.data.name)  # binary feedback: two examples a pair
        self.stage_budget.check_fits(pair_count(self.train_rows), cfg.data.name)
        self.data_identity = {k: v for k, v in OmegaConf.to_container(cfg.data).items()}
        self.feedback = feedback_from_config(cfg.get("feedback"))  # checks the judge config; loads nothing
        self.feedback_train_rows, self.feedback_selection_rows, self.feedback_record = self.train_rows, None, "human"
        if is_binary(self.train_rows):
            self.check_binary_feedback()
        if is_list(self.train_rows):
            self.check_list_data()
        self.check_tuning_selection()
        self.device = available_device(cfg.device) if on_this_machine else cfg.device
        self.eval_precision = cfg.get("eval_precision", "fp32")  # scoring matmuls (harness.evaluate.engines)
        # task caches (pair log-probs, generations) hold numbers of one precision: bf16 ones live apart
        self.task_cache = self.cache / ("tasks" if self.eval_precision == "fp32" else f"tasks-{self.eval_precision}")
        if on_this_machine:
            check_engine(cfg.engine, self.device)
        self.launch = launch_from_config(cfg)  # processes per training run (harness.run.launch); 1 = this process
        if on_this_machine:  # DeepSpeed installed, among others: this machine's question
            check_launch(self.launch, self.budget, self.methods)
            check_launch(self.launch, self.stage_budget, {})
        self.done = finished_keys(self.results)  # a malformed record refuses the sweep here, before anything is written

    def check_binary_feedback(self) -> None:
        """Binary-feedback data (harness.inputs.data) have no pairs: refuse, before any work, whatever needs them."""
        cfg = self.cfg
        why = f"data set {cfg.data.name} is binary feedback (format: {cfg.data.format}) and has no preference pairs"
        for name, method in self.methods.items():
            if method.data_view == "pairs":
                raise HarnessError(f"{why}; method {name!r} trains on pairs: use an unpaired method (kto) or a pair "
                                   f"data set")
        if cfg.tune.trials:
            raise HarnessError(f"{why}; tune.trials selects by held-out pair accuracy: set tune.trials=0")
        for key, budget in (("budget", self.budget), ("stage_budget", self.stage_budget)):
            if budget.match != "examples":  # tokens / flops targets are a pair method's cost on the budget's pairs
                raise HarnessError(f"{why}; {key}.match={budget.match} measures against a pair method: "
                                   f"set {key}.match=examples")
        if not self.feedback.is_human:
            raise HarnessError(f"{why}; feedback={self.feedback.name} relabels pairs: set feedback=human")

    def check_tuning_selection(self) -> None:
        """Tuning selects on the last ``tune.heldout_pairs`` held-out pairs, ``heldout_preference`` scores the first
        ``limit``: refuse a sweep where the two overlap (the chosen variant would be scored on the pairs it was picked
        by)."""
        task = self.tasks.get("heldout_preference")
        if not self.cfg.tune.trials or task is None or is_binary(self.heldout_rows):
            return
        held, selection = len(self.heldout_rows), int(self.cfg.tune.heldout_pairs)
        scored = held if task.limit is None else min(task.limit, held)
        if selection >= held:
            raise HarnessError(f"tune.heldout_pairs={selection} takes all {held} held-out pairs for tuning and leaves "
                               f"heldout_preference none to score apart: set tune.heldout_pairs below {held}")
        if scored + selection > held:
            raise HarnessError(
                f"tune.trials={self.cfg.tune.trials} selects on the last {selection} of the {held} held-out pairs, and "
                f"heldout_preference scores the first {scored}: they overlap; set "
                f"+task_params.heldout_preference.limit={max(held - selection, 0)} or tune.heldout_pairs={max(held - scored, 1)}")

    def check_list_data(self) -> None:
        """List data (harness.inputs.data, format: list) train list methods only: refuse the rest before any work."""
        cfg = self.cfg
        why = f"data set {cfg.data.name} is listwise (format: {cfg.data.format})"
        for name, method in self.methods.items():
            if method.data_view != "lists":
                raise HarnessError(f"{why}; method {name!r} trains on the {method.data_view} view: use a list method "
                                   f"(lipo, rrhf, pro) or a pair data set")
        if cfg.tune.trials:
            raise HarnessError(f"{why}; tune.trials selects by held-out pair accuracy: set tune.trials=0")
        if not self.feedback.is_human:
            raise HarnessError(f"{why}; feedback={self.feedback.name} relabels pairs: set feedback=human")

    def seed_budget(self, seed: int | None) -> Budget:
        """The budget a run of ``seed`` trains under (None: the first seed's): ``budget`` with that seed."""
        return self.budget if seed is None else replace(self.budget, seed=seed)

    # 2. feedback --------------------------------------------------------------------------
    def label_feedback(self) -> None:
        """AI feedback: relabel the pairs methods train on (and the tuning selection pairs) with the judge."""
        from harness.train.feedback import label_pairs, record_summary, write_items

        if self.feedback.is_human or not self.method_names:
            return
        self.feedback = feedback_from_config(self.cfg.feedback, device=self.device, cache_dir=self.cache)
        needed = self.budget.pairs
        if self.cfg.reward.get("kind") == "bradley-terry" and any(
                getattr(m, "needs_reward", False) for m in self.methods.values()):  # its reward model trains on them too
            needed = max(needed, self.reward_budget.pairs)
        log.info("feedback %s: labelling %d training pairs with %s %s", self.feedback.name, needed,
                 self.feedback.judge.type, self.feedback.judge_config.get("model"))
        train = label_pairs(self.train_rows, self.feedback, needed=needed, cache_dir=self.cache / "feedback",
                            purpose="training")
        selection = None
        if self.cfg.tune.trials:
            selection = label_pairs(self.heldout_rows[-self.cfg.tune.heldout_pairs:], self.feedback, needed=None,
                                    cache_dir=self.cache / "feedback", purpose="selection", refill=False)
            self.feedback_selection_rows = selection.rows
        key = config_hash(train.summary["cache_keys"] + [self.feedback.draw_margin, self.feedback.ties])
        file = f"feedback/{key}.jsonl"
        write_items(self.results / file, self.train_rows[: len(train.items)], train.items)
        self.feedback_train_rows = train.rows
        self.feedback_record = record_summary(self.feedback, train, selection, file)
        agreement = train.summary["agreement_with_human"]
        log.info("feedback %s: %d pairs judged (%s), %d flipped, %d tied; agreement with human labels %.3f ± %.3f",
                 self.feedback.name, train.summary["pairs_judged"], train.summary["cache"], train.summary["flipped"],
                 train.summary["tied"], agreement["value"], agreement["stderr"] or 0.0)

    # 2. starting checkpoints --------------------------------------------------------------
    def start_point(self, setting: str, chain: tuple = ()) -> StartPoint:
        if setting in self._starts:
            return self._starts[setting]
        if setting in chain:
            raise HarnessError(f"model.checkpoints.{setting}: derived settings form a cycle {' -> '.join(chain + (setting,))}")
        spec = self.cfg.model.checkpoints.get(setting)
        if not spec:
            raise HarnessError(f"model {self.cfg.model.family} names no checkpoint for setting {setting!r}; "
                               f"set model.checkpoints.{setting}=<hub id or local path>")
        if spec.startswith("derived:"):
            point = self._derived_start(setting, spec, chain)
        else:
            try:
                path = resolve_checkpoint(spec, cache_dir=self.cache, config_key=f"model.checkpoints.{setting}")
                point = StartPoint(setting, {"spec": spec}, path=path)
            except SkipRun as skip:
                point = StartPoint(setting, {"spec": spec}, skip_reason=str(skip))
        self._starts[setting] = point
        return point

    def _derived_start(self, setting: str, spec: str, chain: tuple) -> StartPoint:
        try:
            _, stage, base_setting = spec.split(":")
        except ValueError:
            raise HarnessError(f"model.checkpoints.{setting}={spec}: write derived:<stage method>:<base setting>") from None
        base = self.start_point(base_setting, chain + (setting,))
        method, arguments = registry.build("method", stage, method_overrides(self.stage_budget, None, stage),
                                           params_key="method_params")
        identity = {"derived": stage, "from": base.identity, "budget": self.stage_budget.as_dict(),
                    "method": _hyperparameters(arguments), "data": self.data_identity}
        if base.path is None:
            return StartPoint(setting, identity, skip_reason=f"its base setting {base_setting!r} is skipped: {base.skip_reason}")
        stage_id = config_hash(identity)
        log.info("setting %s: deriving from %s by %s (stage %s)", setting, base_setting, stage, stage_id)
        with self.heartbeat.stage(f"deriving setting {setting} by {stage}"):
            path, consumed = self.train_once(method, base.path, self.stage_budget, stage_id, human_labels=True,
                                             what="derived stage")
        return StartPoint(setting, identity, path=path, consumed=consumed)

    # 4. training ------------------------------------------------------------------------
    def train_once(self, method, start: Path, budget: Budget, run_id: str, *, human_labels: bool = False,
                   what: str = "checkpoint") -> tuple[Path, dict]:
        """``train`` under the checkpoint's cache lock (``harness.inputs.cache.build_once``): fanned-out units that
        need the same checkpoint at once (a derived stage) train it once; the others wait, then reuse it."""
        target = self.cache / "checkpoints" / run_id

        def trained() -> tuple[Path, dict]:
            return self.train(method, start, budget, run_id, human_labels=human_labels)

        return build_once(target, what, lambda: trained() if is_whole(target, what) else None, trained)

    def train(self, method, start: Path, budget: Budget, run_id: str, *, human_labels: bool = False) -> tuple[Path, dict]:
        """Train (or reuse) the checkpoint of ``run_id``; returns (folder, consumed budget). Trains on the sweep's
        feedback labels, or on the data set's own with ``human_labels`` (derived starting settings)."""
        from harness.inputs.tokenizer_cache import load_tokenizer

        target = self.cache / "checkpoints" / run_id
        if is_whole(target, "checkpoint"):  # its manifest matches (harness.inputs.cache)
            log.info("  checkpoint %s cached", run_id)
            return target, json.loads((target / "harness_run.json").read_text())["consumed"]
        tokenizer = load_tokenizer(start)
        staging = temporary_path(target)
        discard(staging)
        train_rows = self.train_rows if human_labels else self.feedback_train_rows
        reward = None
        if getattr(method, "needs_reward", False):  # online / RL methods: a reward model or programmatic reward
            from harness.train.rewards import build_reward

            reward = build_reward(self.cfg.reward, RewardContext(
                start_checkpoint=start, train_pairs=heldout_pairs_of(train_rows),  # lists: best ≻ worst pairs
                heldout_pairs=heldout_pairs_of(self.heldout_rows),
                budget=self.reward_budget, cache_dir=self.cache / "rewards", device=self.device, results_dir=self.results))
        sizes = ModelSizes.of(start, reward, tokenizer) if budget.match != "examples" else None  # online cost models
        launch = self.launch
        plan = plan_training(budget, method, train_rows, self.heldout_rows, tokenizer, sizes=sizes,
                             world=launch.processes if launch.distributed else None)  # once per run
        job = TrainingJob(start_checkpoint=start, output_dir=staging, reward=reward, plan=plan, seed=budget.seed,
                          scratch_dir=temporary_path(self.cache / "scratch" / run_id),
                          reference_cache_dir=self.cache / "reference_logprobs", cache_root=self.cache,
                          engine=self.cfg.engine)
        # a memory-heavy training (PPO on Gemma) waits for another one on this machine (harness.train.memory_gate)
        policy_parameters = (sizes.policy if sizes else _parameter_count(start)) * (launch.processes if
                                                                                  launch.distributed else 1)
        with training_slot(method, policy_parameters, self.cache, self.device), \
                ResourceMeter() as meter:  # with launch.processes > 1: wall time of the launch; memory of this process
            if launch.distributed:
                outcome = train_in_processes(launch, method, job, plugins=list(self.cfg.get("plugins") or []),
                                             work_dir=temporary_path(self.cache / "launch" / run_id))
            else:
                outcome = method.train(job)
        parameters = _parameter_count(staging)
        consumed = {
            "optimizer_steps": outcome.optimizer_steps,
            "examples": outcome.examples,
            "pairs": outcome.pairs,
            "policy_tokens": outcome.policy_tokens,
            "reference_tokens": outcome.reference_tokens,
            "parameters": parameters,
            "flops": training_flops(parameters, outcome.policy_tokens, outcome.reference_tokens),
            "wall_seconds": round(meter.wall_seconds, 2),
            "peak_memory_mib": round(meter.peak_memory_mib, 1),
            **plan.matching,
            **plan.record(),
            **launch.record(),  # processes (1 unless launch.processes says otherwise): not in the run id
            **outcome.extra,
        }
        consumed.update(match_quality(consumed))  # consumed / target under budget.match=tokens|flops
        atomic_write_text(staging / "curves.jsonl", "".join(json.dumps(c) + "\n" for c in outcome.curves))
        atomic_write_text(staging / "harness_run.json", json.dumps({"run_id": run_id, "consumed": consumed}, indent=2))
        debug.reached("checkpoint_write")
        return publish(staging, target), consumed  # the manifest last, then the rename

    # 3./4. scoring -----------------------------------------------------------------------
    def scored_everywhere(self, run_id: str) -> bool:
        """Every task of the sweep has an ``ok`` record of ``run_id``."""
        finished = finished_keys(self.results)
        return all((run_id, self.score_key(task, run_id).task_key) in finished for task in self.tasks)

    def score(self, unit: dict, checkpoint: Checkpoint | None, consumed: dict, done: set) -> None:
        for task_name, task in self.tasks.items():
            key = self.score_key(task_name, unit["run_id"])
            task_key = key.task_key
            if (unit["run_id"], task_key) in done:
                log.info("  %s: done before, skipped", task_name)
                continue
            record = {**unit, "task": task_name, "task_key": task_key, "task_version": str(task.version),
                      "score_key": key.value, "measurement": key.measurement, "measurement_key": key.measurement_key,
                      "task_config": self.task_configs[task_name], "consumed": consumed, "metrics": {},
                      "started_at": now(), "status": "ok", "reason": None}
            if checkpoint is None:
                record.update(status=unit["status"], reason=unit["reason"])
            else:
                record["chat_template"] = {"used": checkpoint.use_chat_template, "sha": checkpoint.chat_template_sha}
                try:
                    context = TaskContext(data_mirror=self.mirror, cache_dir=self.task_cache,
                                          device=self.device, batch_size=self.cfg.eval_batch_size,
                                          heldout_pairs=self.heldout_pairs(checkpoint.reference_path or checkpoint.path),
                                          cache_root=self.cache, engine=self.cfg.engine)
                    log.info("  %s: scoring", task_name)
                    with self.heartbeat.stage(f"scoring {task_name}"), scoring_precision(self.eval_precision, self.device):
                        result = task.evaluate(checkpoint, context)
                    record["metrics"] = {name: {"value": m.value, "stderr": m.stderr, "higher_is_better": m.higher_is_better}
                                         for name, m in result.metrics.items()}
                    record["task_details"] = result.details
                    record["samples_file"] = write_samples(self.results, unit["run_id"], task_key, result.samples)
                except HarnessError:
                    raise
                except Exception as error:  # a broken task run is recorded; the sweep goes on
                    record.update(status="failed", reason=_failure(error, self.results, unit["run_id"]))
            record["finished_at"] = now()
            append_record(self.results, record)
            shown = {k: v for k, v in record["metrics"].items() if "/" not in k}  # breakdowns are in the record
            log.info("  %s: %s %s%s", task_name, record["status"],
                     " ".join(f"{k}={v['value']:.4f}±{(v['stderr'] or 0):.4f}" for k, v in shown.items()),
                     f" (+{len(record['metrics']) - len(shown)} breakdowns)" if len(shown) < len(record["metrics"]) else "")

    # the whole sweep -------------------------------------------------------------------
    def units(self) -> list[tuple[str, str, int | None]]:
        """The sweep's units of work in run order: (setting, method, seed) for every setting, its starting row first
        (method ``start``, seed None: scored once, when ``include_start``), then each method once per seed."""
        starts = [(START, None)] if self.cfg.include_start else []
        return [(setting, method, seed) for setting in self.settings
                for method, seed in starts + [(m, seed) for m in self.method_names for seed in self.seeds]]

    def run(self) -> Path:
        """The whole sweep in this process: every unit in turn, then the leaderboard."""
        self.prepare()
        with self.heartbeat.stage("labelling training pairs (AI feedback)"):
            self.label_feedback()
        units = self.units()
        log.info("sweep %s: %d runs × %d tasks → %s", self.cfg.name, len(units), len(self.tasks), self.results)
        for index, (setting, method_name, seed) in enumerate(units, start=1):
            log.info("[%d/%d] %s · %s%s", index, len(units), setting, method_name,
                     "" if seed is None or len(self.seeds) == 1 else f" · seed {seed}")
            self.run_unit(setting, method_name, seed)
            release_memory()  # the next unit gets the freed heap back (harness.train.memory_gate)
        return self.finish()

    def prepare(self, *, job: bool = False, on_this_machine: bool = True) -> None:
        """Validate (nothing is written before this passes), then remove the temporaries of dead writers, write
        ``sweep_config.yaml`` and an experiment's published numbers. A fanned-out ``job`` (``harness.run.fanout``)
        only validates: its parent did the rest before launching it, and its siblings may be writing elsewhere. A
        parent whose jobs run on other machines checks the device by name only (``on_this_machine=False``)."""
        debug.arm(OmegaConf.select(self.cfg, "debug.kill_at", default=None))  # a test hook; off by default
        self.validate(on_this_machine=on_this_machine)
        if not self.cfg.get("progress_bars", False):  # after validation: it imports the trainer (seconds)
            quiet_progress_bars()
        if job:
            return
        for root in (self.cache, self.results):  # what killed writers left behind (harness.inputs.cache)
            remove_stale_temporaries(root)
        self.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results / "sweep_config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.cfg.get("published"):  # an experiment's published reference numbers, shown beside ours
            atomic_write_text(self.results / "published.json",
                              json.dumps(OmegaConf.to_container(self.cfg.published), indent=1))

    def run_unit(self, setting: str, method_name: str, seed: int | None = None) -> None:
        """One unit of work: a setting's starting row (``start``) or one method trained from it under ``seed`` (None:
        the first of ``seeds``), scored on every task; a task already ``ok`` in the records is skipped. A failure is
        recorded and the caller goes on."""
        done = self.done
        with self.heartbeat.stage(f"preparing the {setting} starting checkpoint"):
            start = self.start_point(setting)
        if method_name == START and not self.cfg.include_start:  # a fanned-out setting's stage only (fanout.py)
            return
        method, arguments, tuning = self.methods.get(method_name), self.method_arguments.get(method_name), None
        if method_name != START and self.cfg.tune.trials and start.path is not None:
            if (setting, method_name) not in self._tuned:  # once for all seeds: trials under the first seed
                self._tuned[(setting, method_name)] = self.tune(method_name, start)
            method, arguments, tuning = self._tuned[(setting, method_name)]
        unit = self._unit(setting, method_name, start, method, arguments, seed)
        if tuning:
            unit["tuning"] = tuning
        if all((unit["run_id"], self.score_key(t, unit["run_id"]).task_key) in done for t in self.tasks):
            log.info("  done before, skipped")
            return
        if start.path is None:
            self.score({**unit, "status": "skipped", "reason": start.skip_reason}, None, {}, done)
            return
        if method_name == START:
            self.score(unit, self._checkpoint(start.path, setting, reference=None), start.consumed, done)
            return
        try:
            with self.heartbeat.stage(f"training {unit['variant']}"):
                path, consumed = self.train_once(method, start.path, self.seed_budget(seed), unit["run_id"])
        except HarnessError:
            raise
        except Exception as error:
            reason = _failure(error, self.results, unit["run_id"])
            log.error("  training failed: %s", reason)
            self.score({**unit, "status": "failed", "reason": reason}, None, {}, done)
            return
        curves = path / "curves.jsonl"
        if curves.exists():  # training curves travel with the records, for the leaderboard's plots
            atomic_write_text(self.results / "curves" / f"{unit['run_id']}.jsonl", curves.read_text(),
                              point="curve_write")
        self.score(unit, self._checkpoint(path, setting, reference=start.path), consumed, done)
        if not self.cfg.get("keep_checkpoints", True) and self.scored_everywhere(unit["run_id"]):
            with entry_lock(path):  # scored on every task: the records hold all it gives (a new task retrains it)
                discard(path)
            log.info("  checkpoint %s dropped (keep_checkpoints=false)", unit["run_id"])

    def finish(self) -> Path:
        """Rebuild the leaderboard from the records; returns its Markdown file."""
        from harness.report.leaderboard import build_leaderboard

        with self.heartbeat.stage("building the leaderboard"):
            outputs = build_leaderboard(self.results)
        return outputs["markdown"]

    def tune(self, name: str, start: StartPoint) -> tuple[object, dict, dict]:
        """Equal tuning effort: ``tune.trials`` draws from the method's ``tune_grid``, each trained under the
        sweep's budget and scored by held-out preference accuracy of the method's implicit reward
        (log-ratio for reference-based methods, mean log-prob for reference-free ones) on the *last*
        ``tune.heldout_pairs`` held-out pairs — the ``heldout_preference`` task scores the first ones."""
        from harness.evaluate.logprobs import preference_accuracy

        tune = self.cfg.tune
        combinations = self.tuning_draws(name)
        pairs = self.selection_pairs(start.path)
        reference = self.selection_logps(start.path, pairs)
        trials, best = [], None
        for index, params in enumerate(combinations[: tune.trials], start=1):
            overrides = OmegaConf.merge(method_overrides(self.budget, self.cfg.method_params.get(name), name), params)
            method, arguments = registry.build("method", name, overrides, params_key="method_params")
            kind = "logratio" if method.reference_based else "avg_logp"
            run_id = self.run_spec(start.setting, name, start, method, arguments).run_id
            log.info("  tune %s trial %d/%d %s", name, index, tune.trials, params)
            trial = {"params": params, "run_id": run_id, "selected_by": f"heldout_{kind}_accuracy"}
            try:
                with self.heartbeat.stage(f"tuning {name}: trial {index}/{tune.trials}"):
                    path, consumed = self.train_once(method, start.path, self.budget, run_id)
                policy = self.selection_logps(path, pairs)
                value, stderr, _ = preference_accuracy(policy, reference)[kind]
                trial.update(accuracy=value, stderr=stderr, flops=consumed["flops"], status="ok")
                if best is None or value > best[1]["accuracy"]:
                    best = (method, trial, arguments)
            except HarnessError:
                raise
            except Exception as error:
                trial.update(status="failed", reason=_failure(error, self.results, run_id))
            trials.append(trial)
        if best is None:
            raise HarnessError(f"method {name!r}: every tuning trial failed (see {self.results / 'logs'})")
        log.info("  tune %s: chose %s (accuracy %.3f)", name, best[1]["params"], best[1]["accuracy"])
        return best[0], best[2], {"trials": trials, "chosen": best[1]["params"], "heldout_pairs": len(pairs),
                         "total_flops": sum(t.get("flops", 0) for t in trials)}

    def tuning_draws(self, name: str) -> list[dict]:
        """The ``tune.trials`` grid draws of method ``name`` (its ``tune_grid``, shuffled by ``tune.seed``), in the
        order they are trained; one line when there is no grid or fewer combinations than trials."""
        import itertools
        import random

        tune = self.cfg.tune
        grid = registry.group_config("method", name).get("tune_grid")
        if not grid:
            raise HarnessError(f"method {name!r} has no tune_grid in conf/method/{name}.yaml; add one or set tune.trials=0")
        keys = sorted(grid)
        combinations = [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]
        if len(combinations) < tune.trials:
            raise HarnessError(f"method {name!r}: tune_grid has {len(combinations)} combinations but tune.trials="
                               f"{tune.trials}; every method gets the same number of trials, so lower tune.trials")
        random.Random(tune.seed).shuffle(combinations)
        return combinations[: tune.trials]

    def run_spec(self, setting: str, method_name: str, start: StartPoint, method=None,
                 arguments: dict | None = None, seed: int | None = None) -> RunSpec:
        """The one spec of a unit of work: every hyperparameter (``arguments``, bound by the registry), the budget,
        data, seed (None: the first of ``seeds``), reward and feedback; its ``variant`` names what differs from the
        shipped defaults (never the seed: a variant's seeds share its leaderboard row)."""
        cfg = self.cfg
        if method_name == START:
            return RunSpec(family=cfg.model.family, setting=setting, start=start.identity, method=START, variant=START)
        method = method or self.methods[method_name]
        hyperparameters = _hyperparameters(arguments if arguments is not None else self.method_arguments[method_name])
        reward = None
        if getattr(method, "needs_reward", False):  # the reward is part of what an online method's run is
            from harness.train.rewards import run_identity

            reward = run_identity(cfg.reward, self.reward_budget)
        budget = self.seed_budget(seed)
        spec = RunSpec(family=cfg.model.family, setting=setting, start=start.identity, method=method_name,
                       method_class=type(method).__module__ + "." + type(method).__qualname__,
                       hyperparameters=hyperparameters, budget=budget.as_dict(), data=self.data_identity,
                       seed=budget.seed, reward=reward, feedback=self.feedback.identity(),
                       sampler="vllm" if reward is not None and cfg.engine == "vllm" else None)
        return RunSpec(**{**spec.__dict__, "variant": self.variant(spec, uses_reward=reward is not None)})

    def variant(self, spec: RunSpec, *, uses_reward: bool) -> str:
        """``dpo[beta=0.05,pairs=64]``: the method plus what differs from its YAML, the named budget's YAML, the named
        data set's YAML, and conf/sweep.yaml's data / feedback / reward choices (the budget's name is the folder's)."""
        budget_defaults = _budget_defaults(self.budget.name)
        shipped_budget = Budget.from_config(OmegaConf.create(budget_defaults)) if budget_defaults else None
        # the method's arguments as the named budget ships them: a learning rate the budget sets names no variant,
        # one set on the command line (method_params or budget.learning_rates) names itself as learning_rate=...
        defaults = _default_arguments(self.cfg, spec.method, shipped_budget)
        changed = differences(spec.hyperparameters, defaults)
        for key, value in differences({k: v for k, v in spec.budget.items() if k != "learning_rates"},
                                      {k: v for k, v in budget_defaults.items() if k != "learning_rates"}).items():
            if key == "seed":  # the seed is a replicate of the variant, not another variant (the record's ``seed``)
                continue
            changed[key if key not in changed else f"budget.{key}"] = value
        shipped = shipped_choices()
        data_name = self.cfg.data.name
        if data_name != shipped.get("data"):
            changed["data"] = data_name
        changed.update({f"data.{k}": v for k, v in differences(self.data_identity, _group_defaults("data", data_name)).items()})
        if self.feedback.identity() is not None:
            changed["feedback"] = self.cfg.feedback.get("name", "judge")
        reward_name = self.cfg.reward.get("name") or self.cfg.reward.get("kind")
        if uses_reward and reward_name and reward_name != shipped.get("reward"):
            changed["reward"] = reward_name
        if self.cfg.tune.trials:
            changed["tune.trials"] = self.cfg.tune.trials
        if spec.sampler is not None:
            changed["sampler"] = spec.sampler
        return variant_name(spec.method, changed)

    def selection_logps(self, path: Path, pairs: list[dict]) -> list[dict]:
        """Pair log-probs of the model at ``path`` on tuning selection pairs, scored as the tasks are (precision, cache)."""
        from harness.evaluate.logprobs import cached_pair_logps

        with scoring_precision(self.eval_precision, self.device):
            return cached_pair_logps(path, pairs, self.task_cache, batch_size=self.cfg.eval_batch_size,
                                     device=self.device)

    def score_key(self, task_name: str, run_id: str) -> ScoreKey:
        """What the task's numbers depend on: task, version, its bound config, the evaluation settings it reads (the
        scoring batch; the held-out split and its truncation for tasks that read held-out pairs) and the checkpoint."""
        task = self.tasks[task_name]
        evaluation = {"eval_batch_size": self.cfg.eval_batch_size, "engine": self.cfg.engine}
        if self.eval_precision != "fp32":  # fp32 records keep the key they always had
            evaluation["precision"] = self.eval_precision
        if getattr(task, "reads_heldout_pairs", False):
            evaluation["heldout_pairs"] = {"data": self.data_identity,
                                           "max_prompt_tokens": self.budget.max_prompt_tokens,
                                           "max_completion_tokens": self.budget.max_completion_tokens}
        return ScoreKey(task=task_name, version=str(task.version), config=_hyperparameters(self.task_arguments[task_name]),
                        evaluation=evaluation, run_id=run_id)

    def _unit(self, setting: str, method_name: str, start: StartPoint, method=None, arguments: dict | None = None,
              seed: int | None = None) -> dict:
        """The part of a record that identifies the run: its spec (``run_config``), run id, variant and seed (None for
        an untouched starting checkpoint: no seed moves it)."""
        spec = self.run_spec(setting, method_name, start, method, arguments, seed)
        unit = {"run_id": spec.run_id, "run_config": spec.identity, "variant": spec.variant, "sweep": self.cfg.name,
                "family": self.cfg.model.family, "setting": setting, "method": method_name,
                "budget": None if method_name == START else spec.budget,
                "seed": spec.seed, "versions": self._versions, "data": self.data_provenance,
                "chat_template": None}
        if method_name != START:
            unit["feedback"] = self.feedback_record  # "human", or the judge and its agreement with the human labels
        return unit

    def _checkpoint(self, path: Path, setting: str, reference: Path | None) -> Checkpoint:
        from harness.inputs.tokenizer_cache import load_tokenizer

        template = getattr(load_tokenizer(path), "chat_template", None)
        use = setting != "pretrained" and bool(template)
        return Checkpoint(path=path, setting=setting, use_chat_template=use,
                          chat_template_sha=config_hash(template) if use else None, reference_path=reference)

    def heldout_pairs(self, start: Path) -> list[dict]:
        """Held-out pairs cut to the budget's lengths by the starting checkpoint's tokenizer (once per tokenizer)."""
        from harness.inputs.tokenizer_cache import load_tokenizer

        key = str(start)
        if key not in self._heldout:
            self._heldout[key] = cut_to_budget(heldout_pairs_of(self.heldout_rows),  # lists: (best, worst) pairs
                                               load_tokenizer(start), self.budget)
        return self._heldout[key]

    def selection_pairs(self, start: Path) -> list[dict]:
        """The tuning selection pairs (the last ``tune.heldout_pairs`` held-out pairs) under the sweep's feedback,
        cut to the budget's lengths by the starting checkpoint's tokenizer."""
        from harness.inputs.tokenizer_cache import load_tokenizer

        if self.feedback_selection_rows is None:
            return self.heldout_pairs(start)[-self.cfg.tune.heldout_pairs:]
        key = f"selection:{start}"
        if key not in self._heldout:
            self._heldout[key] = cut_to_budget(self.feedback_selection_rows, load_tokenizer(start),
                                               self.budget)
        return self._heldout[key]


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_sweep_config(cfg: DictConfig) -> None:
    """The sweep's own keys (conf/sweep.yaml): names, lists, switches, tuning, evaluation settings and paths, each
    refused in one line naming the key. Reads no file and writes nothing."""
    def plain(key: str):
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    check_str("name", plain("name"))
    settings = check_names("settings", plain("settings"), "instruct,sft")
    if not settings:
        raise HarnessError(f"settings is empty; name at least one of {', '.join(SETTINGS)}, e.g. settings=[instruct]")
    check_names("methods", plain("methods"), "dpo,kto")
    if not check_names("tasks", plain("tasks"), "truthfulqa_mc"):
        raise HarnessError("tasks is empty; name at least one task, e.g. tasks=[truthfulqa_mc] "
                           f"(available: {', '.join(registry.available('task'))})")
    check_names("plugins", plain("plugins") or [], "../my-plugin")
    check_bool("include_start", plain("include_start"))
    check_bool("fanout", plain("fanout"))
    check_bool("keep_checkpoints", plain("keep_checkpoints"))
    check_int("budget.seed", plain("budget.seed"), minimum=0)  # first: seeds defaults to [budget.seed]
    seeds = check_seeds(plain("seeds"))
    unit = plain("unit")
    if unit is not None:
        setting, method, seed = parse_unit(unit)
        if (setting not in settings or method not in [START, *(plain("methods") or [])]
                or (seed is not None and (method == START or seed not in seeds))):
            raise HarnessError(f"unit={unit} names no unit of this sweep; write unit=<setting>:<method>[:<seed>] with a "
                               f"setting of settings={settings}, start or a method of methods, and a seed of "
                               f"seeds={seeds} (none for start) (or leave unit unset: fanout=true sets it for each job)")
    for group in ("method", "task"):
        params = plain(f"{group}_params")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise HarnessError(f"{group}_params={params!r} must be a mapping; write +{group}_params.<name>.<key>=<value>")
        for name, values in params.items():
            if name not in registry.available(group):
                raise HarnessError(f"{group}_params.{name}: unknown {group} {name!r}; available: "
                                   f"{', '.join(registry.available(group))}")
            if values is not None and not isinstance(values, dict):
                raise HarnessError(f"{group}_params.{name}={values!r} must be a mapping; write "
                                   f"+{group}_params.{name}.<key>=<value>")
    check_int("tune.trials", plain("tune.trials"), minimum=0)
    check_int("tune.heldout_pairs", plain("tune.heldout_pairs"), minimum=1)
    check_int("tune.seed", plain("tune.seed"), minimum=0)
    check_int("eval_batch_size", plain("eval_batch_size"), minimum=1)
    check_choice("eval_precision", plain("eval_precision"), EVAL_PRECISIONS)
    check_engine(plain("engine"))
    check_number("heartbeat_seconds", plain("heartbeat_seconds"), POSITIVE)
    check_bool("progress_bars", plain("progress_bars"))
    device = plain("device")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise HarnessError(f"device={device!r} is not a device; write device=auto, cpu, cuda, cuda:<index> or mps")
    mirror = plain("data_mirror")
    if mirror is not None:
        check_str("data_mirror", mirror)
        if not Path(mirror).expanduser().is_dir():
            raise HarnessError(f"data_mirror={mirror} is not a folder; point it at the data mirror (laid out like "
                               f"../shared/data) or set data_mirror=null to read the hub")
    check_str("paths.results", plain("paths.results"))
    check_str("paths.cache", plain("paths.cache"))
    check_writable_folder("paths.results", Path(plain("paths.results")) / plain("name"))
    check_writable_folder("paths.cache", Path(plain("paths.cache")))


def check_seeds(seeds) -> list[int]:
    """``seeds``: a non-empty list of distinct whole numbers >= 0, refused in one line otherwise."""
    if not isinstance(seeds, list) or not seeds:
        raise HarnessError(f"seeds={seeds!r} must be a non-empty list of training seeds, e.g. seeds=[0] or seeds=[0,1,2]")
    for seed in seeds:
        check_int("seeds", seed, minimum=0)
    if len(set(seeds)) < len(seeds):
        raise HarnessError(f"seeds={seeds} names a seed twice; list each seed once, e.g. seeds=[0,1,2]")
    return seeds


def parse_unit(unit) -> tuple[str, str, int | None]:
    """``<setting>:<method>[:<seed>]`` (fanout's job key) as (setting, method, seed or None: every seed in turn)."""
    setting, _, rest = str(unit).partition(":")
    method, _, seed = rest.partition(":")
    if seed and not seed.isdigit():
        raise HarnessError(f"unit={unit}: the seed after the second ':' must be a whole number, e.g. unit={setting}:"
                           f"{method}:0")
    return setting, method, int(seed) if seed else None


def check_checkpoints(cfg: DictConfig, setting: str, chain: tuple = ()) -> None:
    """A setting's checkpoint spec (``harness.inputs.models.check_checkpoint_spec``) and, for a derived one, its stage
    method and base setting, down the chain. Loads nothing."""
    key = f"model.checkpoints.{setting}"
    spec = cfg.model.checkpoints.get(setting)
    if not spec:
        raise HarnessError(f"model {cfg.model.family} names no checkpoint for setting {setting!r}; "
                           f"set {key}=<hub id or local path>")
    if setting in chain:
        raise HarnessError(f"{key}: derived settings form a cycle {' -> '.join(chain + (setting,))}")
    if not (isinstance(spec, str) and spec.startswith("derived:")):
        check_checkpoint_spec(spec, config_key=key)
        return
    parts = spec.split(":")
    if len(parts) != 3:
        raise HarnessError(f"{key}={spec}: write derived:<stage method>:<base setting>")
    _, stage, base = parts
    if stage not in registry.available("method"):
        raise HarnessError(f"{key}={spec}: unknown method {stage!r}; available: {', '.join(registry.available('method'))}")
    if base not in SETTINGS:
        raise HarnessError(f"{key}={spec}: unknown base setting {base!r}; available: {', '.join(SETTINGS)}")
    check_checkpoints(cfg, base, chain + (setting,))


def available_device(device: str) -> str:
    """``device`` resolved (auto = cuda when there is one, else cpu); a device this machine lacks is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise HarnessError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                               f"write device=auto or device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise HarnessError("device=mps: MPS is not available here; write device=auto or device=cpu")
    return device


def _hyperparameters(arguments: dict) -> dict:
    """A plug-in's bound constructor arguments minus its ``name`` (the name is the spec's method)."""
    return {key: value for key, value in arguments.items() if key != "name"}


def _default_arguments(cfg, method_name: str, budget: Budget | None = None) -> dict:
    """A method's arguments as shipped under ``budget`` (its learning rate, when the budget sets one): what a variant's
    name leaves out."""
    overrides = budget.method_overrides(method_name) if budget is not None else None
    return _hyperparameters(registry.bound_arguments("method", method_name, overrides or None, params_key="method_params")[1])


def method_overrides(budget: Budget, params, method_name: str):
    """The overrides a method is built with: the budget's (its learning rate) under ``method_params.<name>``; always a
    config (empty when neither sets anything)."""
    return OmegaConf.merge(OmegaConf.create(budget.method_overrides(method_name)), params or {})


def _group_defaults(group: str, name: str) -> dict:
    """A group option's YAML as shipped ({} for a name with no file, e.g. one composed inline)."""
    if name not in registry.available(group):
        return {}
    return OmegaConf.to_container(registry.group_config(group, name), resolve=True)


def _budget_defaults(name: str) -> dict:
    values = _group_defaults("budget", name)
    return Budget.from_config(OmegaConf.create(values)).as_dict() if values else {}


def _parameter_count(folder: Path) -> int:
    """Parameters of the saved policy (tied embeddings counted once)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _failure(error: Exception, results: Path, run_id: str) -> str:
    """One line for the record; the whole traceback into ``logs/<run_id>.log``."""
    atomic_write_text(results / "logs" / f"{run_id}.log", "".join(traceback.format_exception(error)))
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message} (traceback: logs/{run_id}.log)"


def run_sweep(cfg: DictConfig) -> Path | None:
    """The sweep of ``cfg`` in this process; with ``unit`` set, that one unit only (a fanned-out job,
    ``harness.run.fanout``), which returns None: its parent builds the leaderboard."""
    registry.activate_plugins(cfg.get("plugins"))  # again here: a multirun job may run in a process of its own
    sweep = Sweep(cfg)
    try:
        if cfg.get("unit"):
            from harness.run.fanout import run_unit_job

            run_unit_job(sweep)
            return None
        return sweep.run()
    finally:
        sweep.heartbeat.close()
