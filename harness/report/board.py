"""The board: a results folder's records grouped into rows, and the numbers every renderer shares.

``harness.report.leaderboard`` (Markdown, CSV, LaTeX), ``harness.report.plots`` and ``harness.report.html``
import this module; it imports none of them.

**Record fields read here** beyond those of ``harness.records``, each with a fallback for older records:

* ``variant`` — the row name: the method plus what differs from its defaults (``dpo``,
  ``dpo[beta=0.05,pairs=64]``; ``start`` for the starting checkpoint). Without it: ``method``.
* ``task_details.judge_check`` — a judged task's check of its judge against GPT-4 (``status`` checked | unchecked,
  ``agreement``, ``best_baseline``, ``baseline_name``, ``pairs``, ``below_baseline``; ``tasks/win_rate.py``).
  Without it: no mark.
* ``measurement_key`` — hash of how a task was measured (task, version, config, evaluation settings, judge):
  equal keys were measured the same way. Without it: ``task_key`` (older records' task-config hash), so an
  older record never counts as measured like a newer one.

**Rows.** One row per (family, setting, variant). Runs that differ only by their seed (``seeds=[0,1,2]``: equal
``run_config`` once ``seed`` and ``budget.seed`` are left out, ``replicate_of``) are the seeds of one row. Two
different runs under one variant label in one (family, setting) that are not seeds of each other are two rows,
labelled ``<variant>#<first 6 characters of run_id>`` (of the seedless config hash for a run with seeds; more
characters if those collide); records without ``run_config`` (older, hand-made) are never folded. Of several
records of one row, seed and task, the newest counts: the later ``finished_at``, then the later in file order (a
record without ``finished_at`` counts as older than one with it).

**Seeds.** A row's seeds' ``ok`` records of a task measured one way become one record (``seed_aggregate``): each
metric's **mean over seeds**, its ``seed_sd`` (sample SD over seeds) and ``seeds`` (how many), and a standard error
sqrt(mean over seeds of stderr² + seed_sd² / seeds) — item noise and seed noise; the item part is conservative, as
the seeds share their items. Unified score and rank use these means. A failed or skipped seed is left out of the
means and named in the row's status. Rows with different numbers of seeds are still one row each and say how many
(``Board.seeds``; the tables add a ``seeds`` column and ``(sd …)`` beside each value when any row has several).

**Comparable.** Two rows' records of a task are compared — a Δ, a paired bootstrap, ``--compare``, a rank —
only when their ``measurement_key``\\ s are equal and their samples hold the same item ids; otherwise the
difference says why in words (``not comparable: measured differently``, ``not comparable: items differ
(32 vs 64)``) and carries no number.
A start row scored more than one way (say on 64 items, then on 32) keeps its newest record of each
measurement: a row's Δ uses the start record measured like the row's own. Its cells and the ranks use its
newest record only, so a rank always compares one measurement.

**Unified score.** Each task's *primary* metrics (the task config's ``primary_metrics``, for a record scored before
its task configured them the shipped config's; by default every metric whose values lie in [0, 1] and whose name has
no ``/`` breakdown) are mapped to [0, 1] with higher
better — ``v`` when higher is better, ``1 − v`` otherwise (toxicity) —; a task's score is the mean of its
mapped primary metrics; the unified score is the mean over the tasks the row was scored on — except a task whose
judge agrees with GPT-4 less than the better of the length and constant baselines on its judge check (any of its
records says ``below_baseline``): that task is left out of every row's unified score, its columns carry
``JUDGE_MARK`` on every export with a one-line footnote (``judge_warning``), unless the records' task config sets
``count_below_baseline_judge: true`` (then it counts, still marked). A task whose judge could not be checked
(``unchecked``: no GPT-4 annotations here) is marked and counted.

**Rank**, within a (family, setting): only rows scored on as many tasks as the most complete row and, on
every task, comparable with the group's reference (the start row, or without one the first row scored on
that task). Competition ranking ("1, 2, 2, 4"): rows sorted by unified score fall into one tie group while
they are less than ``TIE_TOLERANCE`` below the group's best; a tie group shares the rank of its first row.
``TIE_TOLERANCE`` = 1e-4 is far above float noise (merging, reordering, rounding: ≤ 1e-6) and below one
item's weight in the unified score at the suite's full sizes (1 / (tasks × items) ≥ 1.9e-4 for four tasks
of up to 1319 items), so a tie never hides a whole item; whether a larger gap is real is what the Δ
intervals and ``--compare`` answer.

**Intervals.** Every metric shows its standard error (from the record; for a metric in [0, 1] without one,
from the per-item values of its samples). Differences — task score, every metric in [0, 1], the unified
score — are means of per-item paired differences with a percentile bootstrap 95% interval
(``BOOTSTRAP_SAMPLES`` resamples of the items; for the unified score, items resampled within each task).
With seeds the bootstrap has two levels (``hierarchical_bootstrap``; the hierarchical bootstrap of Davison &
Hinkley 1997, *Bootstrap Methods and their Application*, ch. 3): each resample draws each row's seeds with
replacement (one draw for all tasks), then the items with replacement (the same item ids for both rows: paired),
and the statistic is the mean over the drawn seeds of the mean item difference — so the interval widens with
between-seed spread as well as item noise.
A difference then also carries ``seeds`` (the row's count) and ``seed_sd`` (SD over its seeds of their difference).
With one seed on both sides it is the item bootstrap exactly, the same numbers as before seeds existed.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from harness.errors import HarnessError
from harness.identity import config_hash
from harness.inputs.paths import shipped_config
from harness.records import latest_records, read_records
from harness.report.published import check_published

BOOTSTRAP_SAMPLES = 1000   # resamples of the items for paired intervals
BOOTSTRAP_SEED = 0
BOOTSTRAP_CHUNK = 250      # resamples drawn at once (memory: chunk × items integers)
TIE_TOLERANCE = 1e-4       # unified scores closer than this to their tie group's best share its rank (see above)
RUN_ID_CHARS = 6           # run_id characters appended to a variant label shared by several runs
START = "start"            # the starting checkpoint's variant (and method)
CONSUMED_COLUMNS = [
    # (record key, column title)
    ("optimizer_steps", "steps"),
    ("pairs", "pairs"),
    ("policy_tokens", "policy tokens"),
    ("reference_tokens", "ref tokens"),
    ("generation_tokens", "gen tokens"),  # sampled by online methods (prompt + completion), inside FLOPs
    ("flops", "FLOPs"),
    ("match_ratio", "match ratio"),        # budget.match=tokens|flops: consumed / the pair methods' target
    ("wall_seconds", "train s"),
    ("peak_memory_mib", "peak MiB"),
]
SETTING_ORDER = {"pretrained": 0, "sft": 1, "instruct": 2}
JUDGE_MARK = "†"           # on every column of a task whose judge is below baseline or unchecked (see judge_warning)


# ---------------------------------------------------------------------------------------------
# record fields
def variant_of(record: dict) -> str:
    """The record's row name; records written before ``variant`` existed fall back to their method."""
    return record.get("variant") or record["method"]


def measurement_key_of(record: dict) -> str:
    """How the record's task was measured; records written before ``measurement_key`` existed fall back to
    their ``task_key`` (then the task-config hash)."""
    return record.get("measurement_key") or record["task_key"]


def judge_check_of(record: dict) -> dict | None:
    """The record's check of its judge against GPT-4 (``task_details.judge_check``), None for unjudged tasks."""
    return (record.get("task_details") or {}).get("judge_check")


def primary_metrics(record: dict) -> list[str]:
    """What the task score averages (module docstring, "Unified score"): the record's ``task_config.primary_metrics``;
    for a record scored before its task configured them, the shipped config's (those the record has); else every
    metric in [0, 1] without a ``/`` breakdown."""
    metrics = record.get("metrics") or {}
    configured = (record.get("task_config") or {}).get("primary_metrics")
    if configured:
        return [m for m in configured if m in metrics]
    shipped = [m for m in shipped_config("task", str(record.get("task"))).get("primary_metrics") or [] if m in metrics]
    if shipped:
        return shipped
    return [name for name, m in metrics.items()
            if "/" not in name and m.get("value") is not None and 0.0 <= m["value"] <= 1.0]


def mapped(value: float, higher_is_better: bool) -> float:
    return value if higher_is_better else 1.0 - value


def bounded(value) -> bool:
    """A value in [0, 1]: a share or a rate, which gets an interval wherever it appears."""
    return value is not None and 0.0 <= value <= 1.0


def standard_error(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def newer_first_order(records: list[dict]) -> list[dict]:
    """Records oldest first: by ``finished_at`` (none counts as oldest), then file order."""
    return [r for _, r in sorted(enumerate(records), key=lambda pair: (str(pair[1].get("finished_at") or ""), pair[0]))]


def replicate_of(record: dict) -> str:
    """What a record's run is a seed of: the hash of its ``run_config`` without the seed (``seed`` and
    ``budget.seed``), so that runs differing only by seed share it. Records without ``run_config`` (older ones,
    hand-made ones) and starting rows: their own ``run_id``."""
    config = record.get("run_config")
    if not isinstance(config, dict) or record.get("method") == START or "seed" not in config:
        return record["run_id"]
    seedless = {k: v for k, v in config.items() if k != "seed"}
    if isinstance(seedless.get("budget"), dict):
        seedless["budget"] = {k: v for k, v in seedless["budget"].items() if k != "seed"}
    return config_hash(seedless)


def seed_label(record: dict) -> str:
    """The record's seed as a label (its ``run_id`` when it has none: a starting row, an older record)."""
    return str(record["seed"]) if record.get("seed") is not None else record["run_id"]


def row_labels(records: list[dict]) -> dict[str, tuple[str, str]]:
    """run_id → (variant, row label). The variant is that of the run's newest record; the label is the variant,
    with ``#<prefix>`` when one (family, setting, variant) holds several runs that are not seeds of one run
    (``replicate_of``; the prefix is of the run_id, or of the seedless config hash for seeds): two runs under one
    label never merge into one row, the seeds of one run always do."""
    variants = {r["run_id"]: variant_of(r) for r in newer_first_order(records)}
    replicates = {r["run_id"]: replicate_of(r) for r in records}
    runs: dict[tuple, list[str]] = {}
    for record in records:
        group = runs.setdefault((record.get("family"), record["setting"], variants[record["run_id"]]), [])
        if replicates[record["run_id"]] not in group:
            group.append(replicates[record["run_id"]])
    labels: dict[tuple, str] = {}
    for (family, setting, variant), replicate_ids in runs.items():
        if len(replicate_ids) == 1:
            labels[(family, setting, variant, replicate_ids[0])] = variant
            continue
        length = RUN_ID_CHARS
        while len({replicate[:length] for replicate in replicate_ids}) < len(replicate_ids):
            length += 1
        labels.update({(family, setting, variant, replicate): f"{variant}#{replicate[:length]}"
                       for replicate in replicate_ids})
    return {r["run_id"]: (variants[r["run_id"]], labels[(r.get("family"), r["setting"], variants[r["run_id"]],
                                                          replicates[r["run_id"]])]) for r in records}


def seed_aggregate(members: list[dict]) -> dict:
    """One row's records of one task measured one way, one per seed, as one record: each metric's mean over the
    seeds' ``ok`` records with ``seed_sd`` (sample SD over seeds), ``seeds`` (how many) and ``stderr`` =
    sqrt(mean over seeds of stderr² + seed_sd² / seeds) (item and seed variance; the item part is conservative:
    the seeds share their items). ``seed_members`` holds the seeds' records (per-item scores, ``--compare``). A
    single record is returned as it is."""
    if len(members) == 1:
        return members[0]
    ok = sorted((m for m in members if m["status"] == "ok"), key=lambda m: (m.get("seed") is None, m.get("seed") or 0,
                                                                           m["run_id"]))
    if len(ok) < 2:
        return ok[0] if ok else newer_first_order(members)[-1]
    metrics = {}
    for name in dict.fromkeys(n for m in ok for n in (m.get("metrics") or {})):
        parts = [m["metrics"][name] for m in ok if name in (m.get("metrics") or {})]
        values = [float(p["value"]) for p in parts if p.get("value") is not None]
        n = len(values)
        mean = sum(values) / n if n else None
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
        errors = [float(p["stderr"]) for p in parts if p.get("value") is not None and p.get("stderr") is not None]
        stderr = None
        if n and len(errors) == n:
            stderr = math.sqrt(sum(e * e for e in errors) / n + (sd ** 2 / n if sd is not None else 0.0))
        metrics[name] = {"value": mean, "stderr": stderr, "higher_is_better": parts[0]["higher_is_better"],
                         "seed_sd": sd, "seeds": n}
    newest = newer_first_order(ok)[-1]
    return {**newest, "metrics": metrics, "seed": None, "seeds": [m.get("seed") for m in ok],
            "run_ids": [m["run_id"] for m in ok], "seed_members": ok}


def read_published(folder: Path) -> list[dict]:
    """The published reference rows beside the records (``published.json``, written from an experiment config),
    checked as the config's were (``harness.report.published``)."""
    path = Path(folder) / "published.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise HarnessError(f"{path}: not valid JSON ({error.msg}); rewrite it with align-harness leaderboard "
                           f"<folder> --experiment <name>") from None
    return check_published(rows, str(path))


# ---------------------------------------------------------------------------------------------
# the board
class Board:
    """The records of a folder as rows: key = (family, setting, row label), one record per (row, task)."""

    def __init__(self, folder: Path, records: list[dict] | None = None, published: list[dict] | None = None):
        self.folder = Path(folder)
        all_records = read_records(self.folder) if records is None else records
        self.record_count = len(all_records)
        self.records = latest_records(all_records)           # newest per (run_id, task_key)
        self.published = published if published is not None else read_published(self.folder)
        labels = row_labels(self.records)
        self.rows: dict[tuple, dict[str, dict]] = {}           # key → task → the newest record (seeds: aggregated)
        self.measured: dict[tuple, dict[str, dict]] = {}       # (key, task) → measurement key → its newest record
        self.run_records: dict[tuple, list[dict]] = {}          # key → every seed's newest record of each task
        first_seen: dict[tuple, int] = {}
        for index, record in enumerate(self.records):
            first_seen.setdefault(self.key_of(record, labels), index)
        per_run: dict[tuple, dict[str, dict[str, dict]]] = {}  # (key, task) → run_id → measurement key → newest
        newest: dict[tuple, dict] = {}
        for record in newer_first_order(self.records):
            key = self.key_of(record, labels)
            per_run.setdefault((key, record["task"]), {}).setdefault(record["run_id"], {})[measurement_key_of(record)] = record
            newest[(key, record["task"])] = record
            self.rows.setdefault(key, {})
        for (key, task), runs in per_run.items():  # a row's seeds of one task and measurement: one record
            measurements = dict.fromkeys(m for measured in runs.values() for m in measured)
            self.measured[(key, task)] = {m: seed_aggregate([measured[m] for measured in runs.values() if m in measured])
                                          for m in measurements}
            self.rows[key][task] = self.measured[(key, task)][measurement_key_of(newest[(key, task)])]
            self.run_records.setdefault(key, []).extend(newer_first_order(list(measured.values()))[-1]
                                                        for measured in runs.values())
        self.variants = {self.key_of(r, labels): labels[r["run_id"]][0] for r in self.records}
        self.methods = {self.key_of(r, labels): r["method"] for r in self.records}
        self.keys = sorted(self.rows, key=lambda k: (str(k[0]), SETTING_ORDER.get(k[1], 9), k[1],
                                                     self.variants[k] != START, first_seen[k]))
        self.tasks = list(dict.fromkeys(r["task"] for r in self.records))
        self._samples: dict[tuple, list[dict]] = {}
        self._differences: dict[tuple, dict | None] = {}   # every renderer asks for the same bootstraps: one each
        self.excluded_tasks = [t for t in self.tasks if self._judge_below_baseline(t) and not self._counted_anyway(t)]
        self._judge_warnings = {t: self._judge_warning_text(t) for t in self.tasks}

    @staticmethod
    def key_of(record: dict, labels: dict[str, tuple[str, str]]) -> tuple:
        return (record.get("family"), record["setting"], labels[record["run_id"]][1])

    def groups(self) -> dict[tuple, list[tuple]]:
        """(family, setting) → its row keys, the start row first."""
        out: dict[tuple, list[tuple]] = {}
        for key in self.keys:
            out.setdefault(key[:2], []).append(key)
        return out

    def start_key(self, key: tuple) -> tuple | None:
        """The start row of ``key``'s (family, setting), when there is exactly one."""
        starts = [k for k in self.keys if k[:2] == key[:2] and self.variants[k] == START]
        return starts[0] if len(starts) == 1 else None

    def by_key(self, key: tuple) -> list[dict]:
        return list(self.rows.get(key, {}).values())

    def record(self, key: tuple, task: str, *, ok: bool = True, like: str | None = None) -> dict | None:
        """The row's newest record of ``task`` — or, with ``like`` (a measurement key), its newest record measured
        that way when it has one (a start row scored on 64 and then on 32 items compares with rows of either)."""
        record = self.rows.get(key, {}).get(task)
        if like is not None:
            record = self.measured.get((key, task), {}).get(like, record)
        return record if record and (not ok or record["status"] == "ok") else None

    def metric_names(self, *, breakdowns: bool = True) -> list[str]:
        """``task/metric`` columns in task order; without ``breakdowns``, only headline metrics (a breakdown is a
        metric name with a ``/`` of its own, e.g. toxicity's ``toxic_share/group=women``)."""
        names = []
        for task in self.tasks:
            for key in self.keys:
                record = self.record(key, task, ok=False)
                if record:
                    names += [f"{task}/{m}" for m in record.get("metrics") or {} if breakdowns or "/" not in m]
        return list(dict.fromkeys(names))

    def bounded_metric_names(self) -> list[str]:
        """``task/metric`` columns whose every value lies in [0, 1]: each gets a Δ with an interval."""
        out = []
        for column in self.metric_names():
            values = [m.get("value") for m in (self.metric(k, column, fill=False) for k in self.keys) if m]
            if values and all(bounded(v) for v in values):
                out.append(column)
        return out

    def status(self, key: tuple) -> tuple[str, str]:
        """The row's first failure or skip (of any seed), or ok."""
        bad = [r for r in self.by_key(key) if r["status"] != "ok"]
        bad += [r for r in self.run_records.get(key, []) if r["status"] != "ok" and r not in bad]
        if bad and self.seeds(key) > 1:  # which seed, when several
            return bad[0]["status"], f"seed {seed_label(bad[0])}: {bad[0].get('reason') or ''}"
        return (bad[0]["status"], bad[0].get("reason") or "") if bad else ("ok", "")

    def seeds(self, key: tuple) -> int:
        """How many runs (seeds) of the row have an ``ok`` record: 1 for a starting row, 0 when none is ok."""
        return len({r["run_id"] for r in self.run_records.get(key, []) if r["status"] == "ok"})

    @property
    def several_seeds(self) -> bool:
        """Whether any row folds several seeds (the tables then show seed counts and spreads)."""
        return any(self.seeds(key) > 1 for key in self.keys)

    def metric(self, key: tuple, column: str, *, fill: bool = True) -> dict | None:
        """``{value, stderr, higher_is_better}``; a metric in [0, 1] without a standard error gets one from the
        per-item values of its samples (``fill``)."""
        task, name = column.split("/", 1)
        record = self.record(key, task)
        metric = (record.get("metrics") or {}).get(name) if record else None
        if fill and metric and metric.get("stderr") is None and bounded(metric.get("value")):
            stderr = standard_error(list(self.item_scores(key, task, name).values()))
            if stderr is not None:
                spread = metric.get("seed_sd")  # several seeds: the seed-averaged items' error and the seeds'
                stderr = stderr if spread is None else math.sqrt(stderr ** 2 + spread ** 2 / metric["seeds"])
                metric = {**metric, "stderr": stderr}
        return metric

    def consumed(self, key: tuple) -> dict:
        for record in self.by_key(key):
            if record.get("consumed"):
                return record["consumed"]
        return {}

    def run_id(self, key: tuple) -> str | None:
        return next((r["run_id"] for r in self.by_key(key)), None)

    def task_score(self, key: tuple, task: str) -> float | None:
        record = self.record(key, task)
        names = primary_metrics(record) if record else []
        if not names:
            return None
        return sum(mapped(record["metrics"][n]["value"], record["metrics"][n]["higher_is_better"]) for n in names) / len(names)

    def unified(self, key: tuple) -> tuple[float | None, int]:
        scores = [s for s in (self.task_score(key, t) for t in self.unified_tasks()) if s is not None]
        return (sum(scores) / len(scores) if scores else None), len(scores)

    def unified_tasks(self) -> list[str]:
        """The tasks the unified score averages: all but those whose judge is below baseline (module docstring)."""
        return [t for t in self.tasks if t not in self.excluded_tasks]

    # judge checks ---------------------------------------------------------------------------
    def judge_checks(self, task: str) -> list[dict]:
        """The judge checks of ``task``'s scored records, one per distinct check."""
        checks = [judge_check_of(r) for key in self.keys for r in [self.record(key, task)] if r]
        return list({json.dumps(c, sort_keys=True, default=str): c for c in checks if c}.values())

    def _judge_below_baseline(self, task: str) -> list[dict]:
        checks = [c for c in self.judge_checks(task) if c.get("status") == "checked" and c.get("below_baseline")]
        return sorted(checks, key=lambda c: c["agreement"] - c["best_baseline"])

    def _counted_anyway(self, task: str) -> bool:
        configs = [(r.get("task_config") or {}) for key in self.keys for r in [self.record(key, task)] if r]
        return bool(configs) and all(c.get("count_below_baseline_judge") is True for c in configs)

    def judge_warning(self, task: str) -> str | None:
        """One line for the footnote of ``task``'s columns (marked ``JUDGE_MARK``) when its judge agrees with GPT-4 less
        than the better baseline or was not checked; None otherwise (or for a task without a judge)."""
        return self._judge_warnings.get(task)

    def _judge_warning_text(self, task: str) -> str | None:
        below = self._judge_below_baseline(task)
        if below:
            check = below[0]
            judge = check.get("judge") or {}
            counted = ("left out of the unified score" if task in self.excluded_tasks
                       else "counted in the unified score (count_below_baseline_judge: true)")
            return (f"{task}: its judge ({judge.get('type', '?')} {judge.get('model', '')}".rstrip() + ") agrees with "
                    f"GPT-4 {check['agreement']:.3f} vs {check['best_baseline']:.3f} for the "
                    f"{str(check['baseline_name']).replace('_', ' ')} baseline on {check['pairs']} pairs: below the "
                    f"better baseline; {counted}")
        unchecked = [c for c in self.judge_checks(task) if c.get("status") != "checked"]
        if unchecked:
            return f"{task}: its judge was not checked against GPT-4 ({unchecked[0].get('reason') or 'no reason given'})"
        return None

    def judge_mark(self, task: str) -> str:
        """``JUDGE_MARK`` for a task with a ``judge_warning``, else ``""``."""
        return JUDGE_MARK if self.judge_warning(task) else ""

    def judge_footnotes(self, tasks: list[str] | None = None) -> list[str]:
        """``† <judge_warning>`` for each of ``tasks`` (default: all) that has one: what every export prints."""
        return [f"{JUDGE_MARK} {w}" for w in (self.judge_warning(t) for t in (self.tasks if tasks is None else tasks)) if w]

    def marked(self, column: str) -> str:
        """``column`` (``task/metric`` or a task name) with `` †`` when its task has a ``judge_warning``."""
        mark = self.judge_mark(column.split("/", 1)[0])
        return f"{column} {mark}" if mark else column

    # ranks ----------------------------------------------------------------------------------
    def reference(self, members: list[tuple], task: str) -> tuple | None:
        """The row a group's rows must be comparable with on ``task`` to be ranked: the start row, or the first
        row scored on the task."""
        start = next((k for k in members if self.variants[k] == START and self.task_score(k, task) is not None), None)
        return start or next((k for k in members if self.task_score(k, task) is not None), None)

    def ranks(self) -> dict[tuple, int | None]:
        """Competition ranks per (family, setting), ties within ``TIE_TOLERANCE`` sharing one (module docstring)."""
        out: dict[tuple, int | None] = {}
        for members in self.groups().values():
            complete = max(self.unified(k)[1] for k in members)
            references = {t: self.reference(members, t) for t in self.tasks}
            ranked = [k for k in members if self.unified(k)[0] is not None and self.unified(k)[1] == complete
                      and all(self.same_measurement(k, references[t], t) and self.incomparability(k, references[t], t) is None
                              for t in self.tasks if self.task_score(k, t) is not None)]
            ranked.sort(key=lambda k: -self.unified(k)[0])
            rank, best = 0, None
            for position, key in enumerate(ranked, start=1):
                score = self.unified(key)[0]
                if best is None or best - score >= TIE_TOLERANCE:
                    rank, best = position, score
                out[key] = rank
            for key in members:
                out.setdefault(key, None)
        return out

    # per-item scores and paired differences -------------------------------------------------
    def samples(self, key: tuple, task: str, like: str | None = None) -> list[dict]:
        """The samples of the row's record of ``task`` (``record``'s ``like``; of several seeds, the newest's), those
        with an ``item_id``."""
        record = self.record(key, task, like=like)
        return self.record_samples(record) if record else []

    def record_samples(self, record: dict) -> list[dict]:
        """A record's samples that have an ``item_id`` (read once)."""
        cache_key = (record["run_id"], record.get("task_key"))
        if cache_key not in self._samples:
            path = self.folder / (record.get("samples_file") or "")
            samples = []
            if record.get("samples_file") and path.exists():
                samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            self._samples[cache_key] = [s for s in samples if "item_id" in s]
        return self._samples[cache_key]

    def seed_item_scores(self, key: tuple, task: str, metric: str | None = None,
                         like: str | None = None) -> dict[str, dict[str, float]]:
        """Per seed of the row (``seed_label``): its per-item scores as ``item_scores`` gives them for one record."""
        record = self.record(key, task, like=like)
        if not record:
            return {}
        wanted = {n: record["metrics"][n]["higher_is_better"] for n in primary_metrics(record)}
        out = {}
        for member in record.get("seed_members") or [record]:
            # an item's scores may be spread over several samples (truthfulqa_mc logs one per subtask: mc1, mc2)
            values: dict[str, dict] = {}
            for sample in self.record_samples(member):
                values.setdefault(str(sample["item_id"]), {}).update(
                    {n: v for n, v in (sample.get("scores") or {}).items() if v is not None})
            scores = {}
            for item, item_values in values.items():
                if metric is not None:
                    if metric in item_values:
                        scores[item] = float(item_values[metric])
                    continue
                mapped_values = [mapped(float(v), wanted[n]) for n, v in item_values.items() if n in wanted]
                if mapped_values:
                    scores[item] = sum(mapped_values) / len(mapped_values)
            out[seed_label(member)] = scores
        return out

    def item_scores(self, key: tuple, task: str, metric: str | None = None, like: str | None = None) -> dict[str, float]:
        """Per item: ``metric``'s value, or (no ``metric``) the mean of the task's mapped primary metrics; of several
        seeds, the mean over the seeds (items every seed has)."""
        per_seed = list(self.seed_item_scores(key, task, metric, like).values())
        if len(per_seed) <= 1:
            return per_seed[0] if per_seed else {}
        items = [item for item in per_seed[0] if all(item in scores for scores in per_seed)]
        return {item: sum(scores[item] for scores in per_seed) / len(per_seed) for item in items}

    def same_measurement(self, key: tuple, other: tuple | None, task: str) -> bool:
        """Whether the two rows' *newest* records of ``task`` were measured the same way (what ranks need: one
        measurement for the whole group; a Δ may instead use another record of the start row, ``record(like=)``)."""
        a, b = self.record(key, task), self.record(other, task) if other else None
        return not a or not b or measurement_key_of(a) == measurement_key_of(b)

    def incomparability(self, key: tuple, other: tuple | None, task: str, metric: str | None = None) -> str | None:
        """Why the two rows' records of ``task`` cannot be compared, in words; None when they can (the items are
        checked where both rows have per-item scores)."""
        a = self.record(key, task)
        like = measurement_key_of(a) if a else None
        b = self.record(other, task, like=like) if other else None
        if not a or not b:
            return None
        if like != measurement_key_of(b):
            return "measured differently"
        items_a, items_b = set(self.item_scores(key, task, metric)), set(self.item_scores(other, task, metric, like))
        if items_a and items_b and items_a != items_b:
            shared = "" if len(items_a) != len(items_b) else f", {len(items_a & items_b)} shared"
            return f"items differ ({len(items_a)} vs {len(items_b)}{shared})"
        return None

    def paired_difference(self, key: tuple, other: tuple, task: str, metric: str | None = None) -> dict | None:
        """``key − other`` on ``task``'s score (or on ``metric``) over the same items: ``{difference, low, high,
        items}``; ``{note}`` when not comparable; None when either row lacks the record or per-item scores.
        Computed once per board (the exports and plots all ask); callers get their own copy."""
        memo = ("task", key, other, task, metric)
        if memo not in self._differences:
            self._differences[memo] = self._paired_difference(key, other, task, metric)
        found = self._differences[memo]
        return dict(found) if found is not None else None

    def _paired_difference(self, key: tuple, other: tuple, task: str, metric: str | None) -> dict | None:
        a = self.record(key, task)
        like = measurement_key_of(a) if a else None
        b = self.record(other, task, like=like)
        if not a or not b or (metric is not None and not (metric in (a.get("metrics") or {}) and metric in (b.get("metrics") or {}))):
            return None
        reason = self.incomparability(key, other, task, metric)
        if reason:
            return {"note": f"not comparable: {reason}"}
        return hierarchical_bootstrap(self.seed_item_scores(key, task, metric),
                                      self.seed_item_scores(other, task, metric, like))

    def unified_difference(self, key: tuple, other: tuple) -> dict | None:
        """``key − other`` on the unified score: per task the paired item differences, items resampled within
        each task; only over tasks both rows were scored on, all comparable. Computed once per board."""
        memo = ("unified", key, other)
        if memo not in self._differences:
            self._differences[memo] = self._unified_difference(key, other)
        found = self._differences[memo]
        return dict(found) if found is not None else None

    def _unified_difference(self, key: tuple, other: tuple) -> dict | None:
        tasks = [t for t in self.unified_tasks()
                 if self.task_score(key, t) is not None or self.task_score(other, t) is not None]
        if any(self.task_score(key, t) is None or self.task_score(other, t) is None for t in tasks):
            return {"note": "not comparable: scored on different tasks"}
        for task in tasks:
            reason = self.incomparability(key, other, task)
            if reason:
                return {"note": f"not comparable: {task} {reason}"}
        strata = [(self.seed_item_scores(key, t),
                   self.seed_item_scores(other, t, like=measurement_key_of(self.record(key, t)))) for t in tasks]
        if not strata or not all(a and b and all(a.values()) and all(b.values()) for a, b in strata):
            return None
        return hierarchical_bootstrap(*itertools.chain.from_iterable(strata))

    def pair_differences(self, key: tuple, other: tuple) -> list[dict]:
        """Every difference ``key − other``: the unified score, each task's score, each metric (breakdowns
        included); one dict each, ``task``, ``metric`` and the difference or a ``note``."""
        for row in (key, other):
            if self.unified(row)[0] is None:
                return [{"task": "unified", "metric": "score", "note": f"{row[2]} has no scores ({self.status(row)[0]})"}]
        out = [{"task": "unified", "metric": "score", **(self.unified_difference(key, other) or {"note": "no per-item scores"})}]
        for task in self.tasks:
            a = self.record(key, task)
            b = self.record(other, task, like=measurement_key_of(a) if a else None)
            if not a and not b:
                continue
            if not a or not b:
                out.append({"task": task, "metric": "score", "note": "not scored by both"})
                continue
            out.append({"task": task, "metric": "score",
                        **(self.paired_difference(key, other, task) or {"note": "no per-item scores"})})
            metrics_a, metrics_b = a.get("metrics") or {}, b.get("metrics") or {}
            for name in dict.fromkeys([*metrics_a, *metrics_b]):
                higher = (metrics_a.get(name) or metrics_b.get(name) or {}).get("higher_is_better")
                difference = self.paired_difference(key, other, task, name)
                if difference is None:
                    difference = {"note": "no per-item scores" if name in metrics_a and name in metrics_b
                                  else "not reported by both"}
                out.append({"task": task, "metric": name, "higher_is_better": higher, **difference})
        return out


def paired_bootstrap(*strata: dict[str, float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Mean of a − b over the items both have, with a percentile 95% interval from resampling items.

    ``paired_bootstrap(a, b)``; with more pairs ``paired_bootstrap(a1, b1, a2, b2, ...)`` the statistic is the
    mean over the pairs (tasks) of each pair's mean difference, items resampled within each pair.
    """
    import numpy as np

    differences = []
    for a, b in zip(strata[0::2], strata[1::2]):
        items = sorted(set(a) & set(b))
        if not items:
            return None
        differences.append(np.array([a[i] - b[i] for i in items], dtype=float))
    if not differences:
        return None
    generator = np.random.default_rng(seed)
    means = np.zeros(samples)
    for values in differences:
        n = len(values)
        for first in range(0, samples, BOOTSTRAP_CHUNK):
            count = min(BOOTSTRAP_CHUNK, samples - first)
            means[first:first + count] += values[generator.integers(0, n, size=(count, n))].mean(axis=1)
    means = np.sort(means / len(differences))
    low, high = means[int(0.025 * samples)], means[min(samples - 1, int(math.ceil(0.975 * samples)) - 1)]
    mean = sum(float(values.sum()) / len(values) for values in differences) / len(differences)
    return {"difference": mean, "low": float(low), "high": float(high), "items": sum(len(v) for v in differences)}


def hierarchical_bootstrap(*strata: dict[str, dict[str, float]], samples: int = BOOTSTRAP_SAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> dict | None:
    """``paired_bootstrap`` over seeds and items: each of a and b is {seed label: {item: score}} (one entry for a
    starting row or a one-seed row). The statistic is the mean over a's seeds of the mean item score minus the same
    for b, on the items every seed of both has; each resample draws a's seeds and b's seeds with replacement, then
    the items with replacement (the same items for a and b: paired), and with several pairs (tasks) averages their
    statistics, the seeds drawn once for all tasks when each side has the same seeds on every task. With one seed on
    each side it is ``paired_bootstrap`` exactly (the item draws come from the same generator either way; the seed
    draws from one of their own). Adds ``seeds`` (a's) and ``seed_sd`` (SD over a's seeds of their difference from
    b's seed mean; None for one seed) to ``paired_bootstrap``'s dict."""
    import numpy as np

    pairs = list(zip(strata[0::2], strata[1::2]))
    if not pairs or not all(a and b for a, b in pairs):
        return None
    if all(len(a) == 1 and len(b) == 1 for a, b in pairs):
        result = paired_bootstrap(*(next(iter(side.values())) for side in strata), samples=samples, seed=seed)
        return None if result is None else {**result, "seeds": 1, "seed_sd": None}
    arrays, labels_a, labels_b = [], [], []
    for a, b in pairs:
        runs = [*a.values(), *b.values()]
        items = sorted(set(runs[0]).intersection(*runs[1:]))
        if not items:
            return None
        labels_a.append(tuple(sorted(a)))
        labels_b.append(tuple(sorted(b)))
        arrays.append((np.array([[a[label][i] for i in items] for label in labels_a[-1]], dtype=float),
                       np.array([[b[label][i] for i in items] for label in labels_b[-1]], dtype=float)))
    item_generator = np.random.default_rng(seed)        # the stream paired_bootstrap draws its items from
    seed_generator = np.random.default_rng([seed, 1])   # seeds from their own stream

    def seed_weights(labels: list[tuple]) -> list:
        """Per task: a (samples × seeds) matrix of resampled-seed weights (draw counts / seeds); one for all tasks
        when they have the same seeds."""
        drawn: dict = {}
        shared = len(set(labels)) == 1
        out = []
        for index, names in enumerate(labels):
            slot = names if shared else index
            if slot not in drawn:
                count = len(names)
                draws = seed_generator.integers(0, count, size=(samples, count))
                weights = np.zeros((samples, count))
                np.add.at(weights, (np.arange(samples)[:, None], draws), 1.0 / count)
                drawn[slot] = weights
            out.append(drawn[slot])
        return out

    weights_a, weights_b = seed_weights(labels_a), seed_weights(labels_b)
    means = np.zeros(samples)
    for (a, b), wa, wb in zip(arrays, weights_a, weights_b):
        n = a.shape[1]
        for first in range(0, samples, BOOTSTRAP_CHUNK):
            count = min(BOOTSTRAP_CHUNK, samples - first)
            items = item_generator.integers(0, n, size=(count, n))
            per_item = wa[first:first + count] @ a - wb[first:first + count] @ b   # resampled seeds' means, per item
            means[first:first + count] += np.take_along_axis(per_item, items, axis=1).mean(axis=1)
    means = np.sort(means / len(arrays))
    low, high = means[int(0.025 * samples)], means[min(samples - 1, int(math.ceil(0.975 * samples)) - 1)]
    difference = sum(float((a.mean(axis=0) - b.mean(axis=0)).mean()) for a, b in arrays) / len(arrays)
    seeds = max(len(names) for names in labels_a)
    seed_sd = None
    if seeds > 1 and len(set(labels_a)) == 1:
        per_seed = sum((a - b.mean(axis=0)).mean(axis=1) for a, b in arrays) / len(arrays)
        seed_sd = float(np.std(per_seed, ddof=1))
    return {"difference": difference, "low": float(low), "high": float(high),
            "items": sum(a.shape[1] for a, _ in arrays), "seeds": seeds, "seed_sd": seed_sd}


# ---------------------------------------------------------------------------------------------
# comparisons between named rows (``align-harness leaderboard --compare``)
def compare(board: Board, *names: str) -> list[dict]:
    """Paired-bootstrap differences A − B of every metric for every pair of the named rows within each
    (family, setting). A name is a row label, a variant or a method (all its variants); pairs follow the names'
    order. With no names, every pair of rows (the start row last, so a difference reads "variant − start")."""
    known = {name: [k for k in board.keys if name in (k[2], board.variants[k], board.methods[k])] for name in names}
    unknown = [name for name, keys in known.items() if not keys]
    if unknown:
        raise HarnessError(f"no variant or method {unknown[0]!r} in {board.folder}; variants here: "
                           f"{', '.join(dict.fromkeys(k[2] for k in board.keys))}")
    rows = []
    for (family, setting), members in board.groups().items():
        if names:
            chosen = list(dict.fromkeys(k for name in names for k in known[name] if k in members))
        else:
            chosen = [k for k in members if board.variants[k] != START] + [k for k in members if board.variants[k] == START]
        for key, other in itertools.combinations(chosen, 2):
            rows += [{"family": family, "setting": setting, "a": key[2], "b": other[2], **difference}
                     for difference in board.pair_differences(key, other)]
    if not rows:
        raise HarnessError(f"no (family, setting) holds two of {', '.join(map(repr, names))}; name two or more "
                           "variants of one setting, or none for every pair")
    return rows


# ---------------------------------------------------------------------------------------------
# what the tables show
def table_rows(board: Board) -> list[dict]:
    """Everything the tables show, one dict per (family, setting, variant), unrounded. A difference from the
    start row that is not comparable has no numbers and its reason in ``<column> note``. When some row folds
    several seeds (``Board.several_seeds``) each row also has ``seeds`` (how many), ``<metric> sd`` (SD over
    seeds) and ``<delta column> seeds`` / ``seed_sd``; a one-seed board has none of these columns."""
    ranks = board.ranks()
    bounded_metrics = board.bounded_metric_names()
    several = board.several_seeds
    rows = []
    for key in board.keys:
        family, setting, label = key
        unified, tasks_scored = board.unified(key)
        status, reason = board.status(key)
        row = {"family": family, "setting": setting, "method": board.methods[key], "variant": label,
               "unified_score": unified, "rank": ranks.get(key), "tasks_scored": tasks_scored}
        if several:
            row["seeds"] = board.seeds(key)
        for column in board.metric_names():
            metric = board.metric(key, column)
            row[column] = metric.get("value") if metric else None
            row[column + " stderr"] = metric.get("stderr") if metric else None
            if several:
                row[column + " sd"] = metric.get("seed_sd") if metric else None
        start = board.start_key(key)
        compared = start is not None and start != key
        for task in board.tasks:
            add_difference(row, f"delta {task}", board.paired_difference(key, start, task) if compared else None,
                           seeds=several)
            warning = board.judge_warning(task)
            if warning and board.record(key, task, ok=False):
                row[f"judge_warning {task}"] = warning
        for column in bounded_metrics:
            task, name = column.split("/", 1)
            add_difference(row, f"delta {column}", board.paired_difference(key, start, task, name) if compared else None,
                           seeds=several)
        consumed = board.consumed(key)
        for name, _ in CONSUMED_COLUMNS:
            row[name] = consumed.get(name)
        row["status"], row["reason"] = status, reason
        rows.append(row)
    return rows


def add_difference(row: dict, column: str, difference: dict | None, *, seeds: bool = False) -> None:
    difference = difference or {}
    row[column] = difference.get("difference")
    for part in ("low", "high", "items", "note") + (("seeds", "seed_sd") if seeds else ()):
        row[f"{column} {part}"] = difference.get(part)


def matrix(board: Board) -> tuple[list[str], list[str], dict[tuple, float | None]]:
    """Row labels, ``family · setting`` columns, and the unified score of each (label, column)."""
    labels = list(dict.fromkeys(k[2] for k in board.keys))
    settings = list(dict.fromkeys(f"{k[0]} · {k[1]}" for k in board.keys))
    cells = {(k[2], f"{k[0]} · {k[1]}"): board.unified(k)[0] for k in board.keys}
    return labels, settings, cells
