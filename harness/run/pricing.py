"""``align-harness plan``: price a sweep before it runs — every unit, its cache status, its FLOPs and device-hours.

The units are the sweep's own, enumerated as ``Sweep.run`` does (each setting × ``start`` + every method × every
seed of ``seeds``), plus what
they need built first: a derived setting's **stage** (``derived:sft:instruct``, under ``stage_budget``), the setting's
Bradley-Terry **reward** model when an online method needs one, each tuning **trial** when ``tune.trials`` > 0, and
the AI **feedback** labelling of the training pairs when ``feedback`` names a judge.
Nothing is trained, loaded or downloaded: the config is validated as the sweep validates it (``Sweep.validate``), run
ids come from ``Sweep.run_spec``, and the cache status is read, never written — checkpoint folders whose files match
their manifest's sizes (``looks_whole`` below) and the ``ok`` records of ``results/<name>/records.jsonl``.

**Training FLOPs** are the field's estimate the harness records for every run (``harness.train.budget.training_flops``:
6·N per trained token + 2·N per forward-only token), summed over the visits the matcher plans
(``harness.train.matching.plan_visits``: ``budget.pairs`` × ``epochs`` under ``match: examples``, the matched visits
under ``tokens`` / ``flops``), each visit priced as the matcher prices it: an offline method's rendered pair lengths
and forward-only ratio (``pair_visit_cost``), an online method's own ``visit_cost`` hook (samples at the length cap)
and ``run_cost``. **Scoring FLOPs** come from each task's ``scoring_cost`` hook (``harness.protocols.ScoringCost``):
2·N per token through the scored checkpoint, 2·N_judge per token through the judge. **Hours** = FLOPs / the
hardware's sustained FLOP/s / 3600 (``conf/hardware/<name>.yaml``, ``plan.hardware``).

N comes, without loading weights, from the checkpoint's safetensors headers (local folder, the harness's cache, the
Hugging Face cache), else from ``config.json`` on the meta device, else from ``model.parameters`` in
``conf/model/<family>.yaml``. Token lengths come from the starting checkpoint's tokenizer when it is local, else from
the text at ``CHARS_PER_TOKEN`` characters a token.

Approximations (the output repeats them): online samples run to ``budget.max_completion_tokens``; a DPO-like method's
reference pass is counted on every visit (the trainers score it once per row: equal at one epoch); the reward model
is priced at the policy's N; scoring counts every log-likelihood request whole (no prefix sharing) and every
generation to its cap, at per-item lengths each task measured; attention's own FLOPs (∝ sequence length²) are left
out; one sustained rate covers training and generation (decode is memory-bound on GPUs: slower than that).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.errors import HarnessError
from harness.identity import config_hash
from harness.inputs.cache import MANIFEST
from harness.inputs.data import BINARY_FORMATS, budget_rows, heldout_pairs_of, is_binary, ranked
from harness.protocols import ScoringCost, ScoringEstimate
from harness.records import finished_keys
from harness.run import registry
from harness.run.spec import START
from harness.train.budget import Budget, training_flops
from harness.train.matching import (ModelSizes, forward_only_ratio, pair_lengths, pair_visit_cost, plan_visits,
                                    reward_model_flops)

CHARS_PER_TOKEN = 4.0    # characters a token when no tokenizer is local (English BPE; SmolLM2's: 4.18 on AlpacaEval text)
TOKENS_PER_TURN = 5      # a chat template's tokens around each message (role markers, end of turn), same case
FORMATS = ("table", "json")


@dataclass(frozen=True)
class Hardware:
    """A device's sustained throughput (``conf/hardware/<name>.yaml``)."""

    name: str
    sustained_flops: float          # FLOP/s the plan assumes: a peak × a utilisation, or a measured rate
    source: str = ""                # where the number comes from

    def hours(self, flops: float) -> float:
        """Device-hours of ``flops``: FLOPs / sustained FLOP/s / 3600."""
        return flops / self.sustained_flops / 3600


def hardware_from_config(plan_cfg) -> Hardware:
    """``plan.hardware`` (a name in conf/hardware/) with ``plan.sustained_flops`` overriding its rate; checked."""
    name = plan_cfg.get("hardware")
    if not isinstance(name, str) or not name:
        raise HarnessError(f"plan.hardware={name!r} must name a file of conf/hardware/; available: "
                           f"{', '.join(registry.available('hardware'))}")
    if name not in registry.available("hardware"):
        raise HarnessError(f"plan.hardware={name}: unknown hardware; available: {', '.join(registry.available('hardware'))}")
    values = OmegaConf.to_container(registry.group_config("hardware", name), resolve=True)
    rate, key = values.get("sustained_flops"), f"conf/hardware/{name}.yaml: sustained_flops"
    if plan_cfg.get("sustained_flops") is not None:
        rate, key = plan_cfg.get("sustained_flops"), "plan.sustained_flops"
    if isinstance(rate, str):
        try:
            rate = float(rate)  # YAML 1.1 reads 2.8e11 (no dot) as a string
        except ValueError:
            pass
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise HarnessError(f"{key}={rate!r} must be a positive number of FLOP/s, e.g. 1.248e14")
    return Hardware(name=str(values.get("name", name)), sustained_flops=float(rate), source=str(values.get("source", "")))


@dataclass
class Unit:
    """One line of the plan."""

    kind: str                       # start | train | stage | reward | trial | feedback
    setting: str
    name: str                       # the variant (dpo, dpo[beta=0.05]), or what the stage / reward / trial is
    run_id: str | None              # the checkpoint's key in <cache>/checkpoints/ (None: known only after tuning)
    checkpoint: str                 # cached | to train | start: <where> | chosen by tuning
    seed: int | None = None         # the training seed (``seeds``); None for start rows, stages, reward models
    tasks_done: list[str] = field(default_factory=list)
    tasks_to_run: list[str] = field(default_factory=list)
    train_flops: float = 0.0        # the unit's own training (0 for start rows and checkpoints trained elsewhere)
    score_flops: float = 0.0        # every task of the unit, done or not
    remaining_flops: float = 0.0    # what a run would still spend: training unless cached, tasks not done
    hours: float = 0.0              # (train_flops + score_flops) / sustained FLOP/s / 3600
    remaining_hours: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class StudyPlan:
    sweep: str
    results: str
    hardware: Hardware
    units: list[Unit]
    parameters: dict                # setting -> (N, where it came from)
    approximations: list[str]

    @property
    def total_flops(self) -> float:
        return sum(u.train_flops + u.score_flops for u in self.units)

    @property
    def remaining_flops(self) -> float:
        return sum(u.remaining_flops for u in self.units)

    def as_dict(self) -> dict:
        return {"sweep": self.sweep, "results": self.results, "hardware": asdict(self.hardware),
                "parameters": self.parameters, "units": [asdict(u) for u in self.units],
                "totals": {"train_flops": sum(u.train_flops for u in self.units),
                           "score_flops": sum(u.score_flops for u in self.units),
                           "flops": self.total_flops, "hours": self.hardware.hours(self.total_flops),
                           "remaining_flops": self.remaining_flops,
                           "remaining_hours": self.hardware.hours(self.remaining_flops)},
                "approximations": self.approximations}


# ------------------------------------------------------------------------------------------------------------------
# cache status, parameters and tokenizers, without loading weights


def looks_whole(folder: Path) -> bool:
    """A cache entry that looks whole: its manifest is there and every file it lists has the listed size. Its SHA-256
    hashes are not read (``harness.inputs.cache.is_whole`` does, before the sweep uses an entry: a minute for a 7B
    checkpoint); a plan only reports."""
    try:
        files = json.loads((Path(folder) / MANIFEST).read_text())["files"]
        return all((Path(folder) / name).stat().st_size == entry["size"] for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _local_folder(spec: str, cache: Path) -> Path | None:
    """The folder a checkpoint spec resolves to if it is already on this machine, else None. Downloads nothing."""
    if spec.startswith("embedded:"):
        folder = cache / "models" / spec.split(":", 1)[1]
        return folder if looks_whole(folder) else None
    if spec.startswith("tiny-random:"):
        folder = cache / "models" / f"tiny-random-{spec.split(':', 1)[1]}"
        return folder if looks_whole(folder) else None
    path = Path(spec).expanduser()
    if path.is_absolute() or spec.startswith((".", "~")) or path.exists():
        return path if (path / "config.json").exists() else None
    try:  # a hub id: the Hugging Face cache only
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _counted_parameters(folder: Path) -> int:
    """Parameters of a local model: its safetensors headers, else its config.json instantiated on the meta device."""
    from harness.train.rewards import parameter_count

    count = parameter_count(folder)
    if count:
        return count
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def configured_parameters(value, key: str) -> int:
    """A ``parameters:`` value of a model config, checked (``key`` names it in the message)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise HarnessError(f"{key}={value!r} must be a positive parameter count, e.g. 7.24e9")
    return int(value)


def parameters_of(spec: str, cache: Path, *, fallback, key: str) -> tuple[int, str]:
    """(N, where from) of a checkpoint spec: counted when local, else the configured ``fallback`` (``key``)."""
    folder = _local_folder(spec, cache)
    if folder is not None:
        return _counted_parameters(folder), f"counted in {folder}"
    if fallback is None:
        raise HarnessError(f"{key} is missing: checkpoint {spec} is not on this machine, so its size is unknown; "
                           f"set {key}=<parameter count> (conf/model/<family>.yaml)")
    return configured_parameters(fallback, key), key


def judge_parameters(spec: str, cache: Path) -> tuple[int, str]:
    """N of a judge model spec: counted when local, else the ``parameters`` of a conf/model family naming that spec."""
    for family in registry.available("model"):
        values = OmegaConf.to_container(registry.group_config("model", family), resolve=True)
        if spec in (values.get("checkpoints") or {}).values() and values.get("parameters") is not None:
            return parameters_of(spec, cache, fallback=values["parameters"], key=f"conf/model/{family}.yaml: parameters")
    return parameters_of(spec, cache, fallback=None, key=f"parameters of judge {spec} (add it to a conf/model file)")


def _tokenizer(folder: Path | None):
    if folder is None:
        return None
    from harness.inputs.tokenizer_cache import load_tokenizer

    return load_tokenizer(folder)


def estimated_lengths(rows: list[dict], budget: Budget) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of each pair from its characters (no tokenizer here), cut to the budget."""
    def tokens(text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    out = []
    for row in rows:
        prompt = sum(tokens(m["content"]) + TOKENS_PER_TURN for m in row["prompt"]) + TOKENS_PER_TURN
        texts = ranked(row)["responses"] if "responses" in row else [row["chosen"], row["rejected"]]  # lists: best first
        out.append((min(prompt, budget.max_prompt_tokens + TOKENS_PER_TURN * len(row["prompt"])),
                    *(min(tokens(text) + 1, budget.max_completion_tokens + 1) for text in texts)))
    return out


def _as_pairs(rows: list[dict]) -> list[dict]:
    """Binary feedback (two examples a budget pair) as pseudo-pairs of consecutive examples, for their lengths."""
    if not is_binary(rows):
        return rows
    return [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for a, b in zip(rows[::2], rows[1::2])]


def token_lengths(rows: list[dict], tokenizer, budget: Budget) -> list[tuple[int, int, int]]:
    """Each pair's (prompt, chosen, rejected) tokens as the trainers see them: cut to the budget and rendered by the
    tokenizer (``harness.train.matching.pair_lengths``), or estimated from characters without one."""
    from harness.train.plan import cut_to_budget

    pairs = _as_pairs(rows)
    if tokenizer is None:
        return estimated_lengths(pairs, budget)
    return pair_lengths(cut_to_budget(pairs, tokenizer, budget), tokenizer)


# ------------------------------------------------------------------------------------------------------------------
# cost models


def training_tokens(budget: Budget, method, lengths: list[tuple[int, int, int]], sizes: ModelSizes,
                    heldout_prompts: int = 0) -> tuple[float, float, int]:
    """(trained, forward-only) tokens in policy-parameter equivalents, and the visits, of ``method`` trained under
    ``budget`` on pairs of ``lengths`` — the visits and per-visit prices of ``harness.train.matching``."""
    visits = plan_visits(budget, method, lengths, sizes, heldout_prompts).visits
    hook = getattr(method, "visit_cost", None)
    completion = budget.max_completion_tokens
    view, ratio = method.data_view, forward_only_ratio(method)
    trained = forward = 0.0
    for index in range(visits):
        length = lengths[index % len(lengths)]
        t, f = hook(length[0], completion, budget, sizes) if hook is not None else pair_visit_cost(view, ratio, length)
        trained, forward = trained + t, forward + f
    if getattr(method, "run_cost", None) is not None:
        mean_prompt = round(sum(length[0] for length in lengths) / len(lengths))
        t, f = method.run_cost(mean_prompt, completion, budget, sizes, heldout_prompts)
        trained, forward = trained + t, forward + f
    return trained, forward, visits


def scoring_flops(cost: ScoringCost, parameters: int, judge: int) -> float:
    """2·N per token through the scored checkpoint, 2·N_judge per token through the judge."""
    return 2.0 * parameters * cost.policy_tokens + 2.0 * judge * cost.judge_tokens


# ------------------------------------------------------------------------------------------------------------------
# the plan


class Pricer:
    """Prices the units of a validated ``Sweep`` (``harness.run.sweep``)."""

    def __init__(self, sweep, hardware: Hardware):
        self.sweep, self.hardware, self.cfg = sweep, hardware, sweep.cfg
        self.cache, self.done = sweep.cache, finished_keys(sweep.results)  # read-only
        self.fallback = OmegaConf.select(self.cfg, "model.parameters", default=None)
        self.units: list[Unit] = []
        self.parameters: dict = {}
        self._starts: dict = {}
        self._lengths: dict = {}
        self._judges: dict = {}

    # starting points --------------------------------------------------------------------------
    def start(self, setting: str):
        """(StartPoint without a path, base spec, folder or None, status text) of a setting, derived stages priced."""
        from harness.run.sweep import StartPoint, _hyperparameters, method_overrides

        if setting in self._starts:
            return self._starts[setting]
        spec = self.cfg.model.checkpoints.get(setting)
        if spec.startswith("derived:"):
            _, stage, base_setting = spec.split(":")
            base, base_spec, folder, _ = self.start(base_setting)
            method, arguments = registry.build("method", stage, method_overrides(self.sweep.stage_budget, None, stage),
                                               params_key="method_params")
            identity = {"derived": stage, "from": base.identity, "budget": self.sweep.stage_budget.as_dict(),
                        "method": _hyperparameters(arguments), "data": self.sweep.data_identity}  # as Sweep._derived_start
            stage_id = config_hash(identity)
            built = looks_whole(self.cache / "checkpoints" / stage_id)
            n = self.size(base_setting)
            trained, forward, visits = training_tokens(
                self.sweep.stage_budget, method, self.lengths(base_setting, self.sweep.stage_budget, self.sweep.train_rows),
                ModelSizes(policy=n))
            flops = training_flops(n, trained, forward)
            self.add(Unit(kind="stage", setting=setting, name=f"{stage} from {base_setting} (stage_budget "
                          f"{self.sweep.stage_budget.name})", run_id=stage_id, checkpoint="cached" if built else "to train",
                          train_flops=flops, remaining_flops=0.0 if built else flops, notes=[f"{visits} visits"]))
            # the stage's tokenizer and size are its base's until it is built
            result = (StartPoint(setting, identity), base_spec,
                      self.cache / "checkpoints" / stage_id if built else folder,
                      "derived, cached" if built else "derived, trained by the stage above")
        else:
            folder = _local_folder(spec, self.cache)
            where = ("local" if folder is not None else
                     "hub, not downloaded (offline: skipped)" if not spec.startswith(("embedded:", "tiny-random:"))
                     else "built on first use")
            result = (StartPoint(setting, {"spec": spec}), spec, folder, where)
        self._starts[setting] = result
        return result

    def size(self, setting: str) -> int:
        if setting not in self.parameters:
            point, spec, folder, _ = self.start(setting)
            if folder is not None:
                self.parameters[setting] = (_counted_parameters(folder), f"counted in {folder}")
            else:
                self.parameters[setting] = parameters_of(spec, self.cache, fallback=self.fallback, key="model.parameters")
        return self.parameters[setting][0]

    def lengths(self, setting: str, budget: Budget, rows: list[dict]) -> list[tuple[int, int, int]]:
        """Pair lengths of ``rows`` under ``budget`` in the setting's tokens (once per setting, budget and rows)."""
        key = (setting, budget.name, budget.max_prompt_tokens, budget.max_completion_tokens, budget.pairs, id(rows))
        if key not in self._lengths:
            folder = self.start(setting)[2]
            self._lengths[key] = token_lengths(budget_rows(rows, budget.pairs), _tokenizer(folder), budget)
        return self._lengths[key]

    def heldout_lengths(self, setting: str) -> list[tuple[int, int, int]]:
        budget = self.sweep.budget
        key = (setting, "heldout")
        if key not in self._lengths:
            folder = self.start(setting)[2]
            self._lengths[key] = token_lengths(heldout_pairs_of(self.sweep.heldout_rows), _tokenizer(folder), budget)
        return self._lengths[key]

    def judge_size(self, spec: str) -> int:
        if spec not in self._judges:
            self._judges[spec] = judge_parameters(spec, self.cache)[0]
        return self._judges[spec]

    # units ------------------------------------------------------------------------------------
    def add(self, unit: Unit) -> Unit:
        unit.hours = self.hardware.hours(unit.train_flops + unit.score_flops)
        unit.remaining_hours = self.hardware.hours(unit.remaining_flops)
        self.units.append(unit)
        return unit

    def score(self, unit: Unit, setting: str, *, is_start: bool, run_ids: list[str]) -> None:
        """Each task's scoring cost; a task is done when one of ``run_ids`` has an ``ok`` record of it."""
        n = self.size(setting)
        estimate = ScoringEstimate(is_start=is_start, chat_template=setting != "pretrained",
                                   heldout_lengths=self.heldout_lengths(setting)
                                   if any(getattr(t, "reads_heldout_pairs", False) for t in self.sweep.tasks.values())
                                   else [])
        for name, task in self.sweep.tasks.items():
            hook = getattr(task, "scoring_cost", None)
            flops = 0.0
            if hook is None:
                unit.notes.append(f"{name}: no scoring_cost, not priced")
            else:
                cost = hook(estimate)
                judge = self.judge_size(cost.judge_model) if cost.judge_model and cost.judge_tokens else 0
                flops = scoring_flops(cost, n, judge)
            unit.score_flops += flops
            if any((run_id, self.sweep.score_key(name, run_id).task_key) in self.done for run_id in run_ids):
                unit.tasks_done.append(name)
            else:
                unit.tasks_to_run.append(name)
                unit.remaining_flops += flops

    def train_unit(self, setting: str, method_name: str, method, arguments, *, kind: str = "train",
                   seed: int | None = None) -> Unit:
        point, _, _, _ = self.start(setting)
        spec = self.sweep.run_spec(setting, method_name, point, method, arguments, seed)
        n = self.size(setting)
        sizes = ModelSizes(policy=n)
        if getattr(method, "needs_reward", False):
            sizes = ModelSizes(policy=n, reward=self.reward_size(setting),
                               reward_reads_policy_tokens=self.cfg.reward.get("kind") == "bradley-terry")
        lengths = self.lengths(setting, self.sweep.budget, self.sweep.feedback_train_rows)
        trained, forward, visits = training_tokens(self.sweep.budget, method, lengths, sizes,
                                                   heldout_prompts=len(self.sweep.heldout_rows))
        flops = training_flops(n, trained, forward)
        cached = looks_whole(self.cache / "checkpoints" / spec.run_id)
        unit = Unit(kind=kind, setting=setting, name=spec.variant, run_id=spec.run_id,
                    checkpoint="cached" if cached else "to train", seed=spec.seed, train_flops=flops,
                    remaining_flops=0.0 if cached else flops,
                    notes=[f"{visits} visits, {trained:.3g} trained + {forward:.3g} forward-only tokens"])
        return unit

    def reward_size(self, setting: str) -> int:
        kind = self.cfg.reward.get("kind")
        if kind == "bradley-terry":
            return self.size(setting)
        if kind == "path" and self.cfg.reward.get("path"):
            return _counted_parameters(Path(self.cfg.reward.path).expanduser())
        return 0

    def reward_unit(self, setting: str) -> None:
        """The setting's Bradley-Terry reward model, trained once under stage_budget, with reward.pairs pairs when set
        (``harness.train.rewards``)."""
        budget = self.sweep.reward_budget
        lengths = self.lengths(setting, budget, self.sweep.train_rows)
        heldout = min(int(self.cfg.reward.get("heldout_pairs", 64)), len(self.sweep.heldout_rows))
        flops = reward_model_flops(self.size(setting), budget, lengths, heldout,
                                   int(self.cfg.reward.get("normalize_pairs", 256)))
        built = any((self.cache / "rewards").glob("bradley-terry-*")) and self._reward_cached(setting)
        self.add(Unit(kind="reward", setting=setting, name=f"bradley-terry reward model (stage_budget {budget.name})",
                      run_id=None, checkpoint="cached" if built else "to train", train_flops=flops,
                      remaining_flops=0.0 if built else flops))

    def _reward_cached(self, setting: str) -> bool:
        """Whether the reward model's cache entry exists: its key hashes the start's weights and the cut rows, known
        only when the start is local (``harness.train.rewards.bradley_terry_reward``)."""
        from harness.train.plan import plan_training
        from harness.train.rewards import REWARD_MODEL, weight_identity

        folder = self.start(setting)[2]
        if folder is None:
            return False
        reward = self.cfg.reward
        plan = plan_training(self.sweep.reward_budget, REWARD_MODEL, self.sweep.train_rows,
                             self.sweep.heldout_rows[: int(reward.get("heldout_pairs", 64))], _tokenizer(folder),
                             match=False, world=1)
        settings = {k: reward.get(k) for k in ("learning_rate", "normalize", "center_rewards_coefficient")}
        identity = {"kind": "bradley-terry", "start": {"path": str(Path(folder).resolve()),
                                                       "weights": weight_identity(folder)},
                    "train": plan.rows, "heldout": plan.heldout, "budget": self.sweep.reward_budget.as_dict(),
                    "settings": settings}
        return looks_whole(self.cache / "rewards" / f"bradley-terry-{config_hash(identity)}")

    def trials(self, setting: str, name: str) -> list[str]:
        """Each tuning trial of ``name`` as a unit (training + selection scoring); returns their run ids."""
        from harness.run.sweep import method_overrides

        tune = self.cfg.tune
        combinations = self.sweep.tuning_draws(name)  # the draws Sweep.tune makes
        n = self.size(setting)
        selection = self.heldout_lengths(setting)[-tune.heldout_pairs:]
        selection_flops = 2.0 * n * sum(2 * p + c + r for p, c, r in selection)  # the trial's held-out log-probs
        run_ids = []
        for index, params in enumerate(combinations[: tune.trials], start=1):
            overrides = OmegaConf.merge(method_overrides(self.sweep.budget, self.cfg.method_params.get(name), name), params)
            method, arguments = registry.build("method", name, overrides, params_key="method_params")
            unit = self.train_unit(setting, name, method, arguments, kind="trial")
            unit.name = f"{name} trial {index}/{tune.trials} {params}"
            unit.score_flops = selection_flops
            unit.remaining_flops += 0.0 if unit.checkpoint == "cached" else selection_flops
            self.add(unit)
            run_ids.append(unit.run_id)
        return run_ids

    def feedback_unit(self, online: bool) -> None:
        """AI feedback (``harness.train.feedback``): the judge labels the training pairs once per sweep, before any
        setting — a local LLM judge reads each pair in both orders, a reward-model judge scores each response once;
        ties dropped and refilled are left out. Priced in the first setting's tokens; its cache is not checked."""
        from harness.evaluate.judges import JUDGE_PROMPT

        sweep = self.sweep
        judge = sweep.feedback.judge_config or {}
        needed = sweep.budget.pairs
        if self.cfg.reward.get("kind") == "bradley-terry" and online:  # its reward model trains on them too
            needed = max(needed, sweep.stage_budget.pairs)
        setting = sweep.settings[0]
        lengths = self.lengths(setting, sweep.budget, sweep.train_rows)[:needed]
        cap = judge.get("max_output_chars")
        cut = float("inf") if cap is None else math.ceil(cap / CHARS_PER_TOKEN)
        if judge.get("type") == "reward_model":
            tokens = sum(2 * p + min(c, cut) + min(r, cut) for p, c, r in lengths)
        else:
            fixed = math.ceil(len(JUDGE_PROMPT.format(instruction="", output_1="", output_2="")) / CHARS_PER_TOKEN)
            tokens = 2 * sum(fixed + TOKENS_PER_TURN + p + min(c, cut) + min(r, cut) for p, c, r in lengths)
        model = None if judge.get("type") == "openai_api" else judge.get("model")
        flops = 2.0 * self.judge_size(model) * tokens if model else 0.0
        self.add(Unit(kind="feedback", setting="all", name=f"{sweep.feedback.name}: label {len(lengths)} pairs",
                      run_id=None, checkpoint="cache not checked", train_flops=flops, remaining_flops=flops,
                      notes=[] if model else ["an API judge: not counted"]))

    def price(self) -> list[Unit]:
        sweep, cfg = self.sweep, self.cfg
        online = [m for m in sweep.method_names if getattr(sweep.methods[m], "needs_reward", False)]
        if not sweep.feedback.is_human and sweep.method_names:
            self.feedback_unit(bool(online))
        for setting in sweep.settings:
            point, spec, folder, where = self.start(setting)
            if cfg.include_start:
                unit = Unit(kind="start", setting=setting, name=START, run_id=None, checkpoint=f"start: {where}")
                unit.run_id = sweep.run_spec(setting, START, point).run_id
                self.score(unit, setting, is_start=True, run_ids=[unit.run_id])
                self.add(unit)
            if online and cfg.reward.get("kind") == "bradley-terry":
                self.reward_unit(setting)
            several = len(sweep.seeds) > 1
            for name in sweep.method_names:
                run_ids = self.trials(setting, name) if cfg.tune.trials else []
                for seed in sweep.seeds:
                    if cfg.tune.trials and seed == sweep.seeds[0]:  # the trials train under the first seed
                        unit = Unit(kind="train", setting=setting, name=f"{name} (best of {cfg.tune.trials} trials)",
                                    run_id=None, checkpoint="chosen by tuning", seed=seed,
                                    notes=["trained as a trial above; scored once chosen"])
                        self.score(unit, setting, is_start=False, run_ids=run_ids)
                    else:
                        unit = self.train_unit(setting, name, sweep.methods[name], sweep.method_arguments[name],
                                               seed=seed)
                        if cfg.tune.trials:  # the chosen hyperparameters, known once tuned: run id unknown here
                            unit.name, unit.run_id, unit.checkpoint = f"{name} (tuned)", None, "chosen by tuning"
                            unit.notes.append("the chosen trial's hyperparameters under this seed; priced at the "
                                              "method's defaults")
                        self.score(unit, setting, is_start=False, run_ids=[unit.run_id] if unit.run_id else [])
                    if several:
                        unit.name += f" · seed {seed}"
                    self.add(unit)
        return self.units


APPROXIMATIONS = [
    "training: 6·N per trained token + 2·N per forward-only token (harness.train.budget.training_flops), over the "
    "visits harness.train.matching plans; a DPO-like reference pass counted on every visit (exact at one epoch)",
    "online methods: every sample runs to budget.max_completion_tokens (the matcher's visit_cost)",
    "scoring: 2·N per token; log-likelihood requests scored whole (no prefix sharing), generations run to their cap, "
    "prompt lengths as each task measured them (tasks/<name>.py scoring_cost)",
    "attention's own FLOPs (∝ sequence length²) left out; the reward model priced at the policy's N",
    "hours: one sustained rate for training and scoring (GPU decode is memory-bound: slower than that)",
]


def longest_pairs(cfg: DictConfig) -> tuple[list[dict], dict]:
    """Stand-in pairs for a data set this machine cannot read (a hub id offline, no mirror file): enough rows for
    the budgets and the held-out split, each at the budgets' longest prompt and completions, so the plan's lengths
    are an upper bound (``estimated_lengths`` cuts them to the budget). Binary-feedback data sets are not stood in."""
    if cfg.data.get("format") in BINARY_FORMATS:
        raise HarnessError(f"data set {cfg.data.name} is binary feedback and not readable here; align-harness plan "
                           f"needs its rows: set data_mirror=<folder holding {cfg.data.get('mirror_file')}>")
    budgets = [cfg.budget, cfg.stage_budget]
    longest = {key: max(int(b[key]) for b in budgets) for key in ("max_prompt_tokens", "max_completion_tokens")}
    # " x" is a token of its own to BPE tokenizers: at least `tokens` of them, and of estimated tokens, before the cut
    text = {key: " x" * math.ceil(tokens * CHARS_PER_TOKEN / 2) for key, tokens in longest.items()}
    size = max(int(b.pairs) for b in budgets) + int(cfg.data.get("heldout_pairs") or 0) + 1
    rows = [{"prompt": [{"role": "user", "content": text["max_prompt_tokens"]}],
             "chosen": text["max_completion_tokens"], "rejected": text["max_completion_tokens"], "source_row": number}
            for number in range(1, size + 1)]
    return rows, {"source": f"stand-in: {size} pairs at the budgets' longest", "rows": size,
                  "dropped_mismatched_prompts": 0}


def price_sweep(cfg: DictConfig) -> StudyPlan:
    """The plan of the sweep ``cfg`` composes: validated as the sweep validates it, nothing written or loaded."""
    from harness.run.sweep import Sweep

    registry.activate_plugins(cfg.get("plugins"))
    plan_cfg = cfg.get("plan") or {}
    fmt = plan_cfg.get("format", "table")
    if fmt not in FORMATS:
        raise HarnessError(f"plan.format={fmt!r} is not offered; available: {', '.join(FORMATS)}")
    hardware = hardware_from_config(plan_cfg)
    fallback = OmegaConf.select(cfg, "model.parameters", default=None)
    if fallback is not None:
        configured_parameters(fallback, "model.parameters")
    sweep = Sweep(cfg)
    unread: list[str] = []
    sweep.validate(on_this_machine=False,  # the study may be meant for GPUs this machine lacks
                   stand_in_rows=lambda error: (unread.append(str(error)), longest_pairs(cfg))[1])
    pricer = Pricer(sweep, hardware)
    units = pricer.price()
    approximations = list(APPROXIMATIONS)
    if any(pricer.start(s)[2] is None for s in sweep.settings):
        approximations.append(f"token lengths without a local tokenizer: {CHARS_PER_TOKEN} characters a token, "
                              f"{TOKENS_PER_TURN} template tokens a turn")
    if unread:
        approximations.append(f"data set {cfg.data.name} not readable here ({unread[0]}): every pair priced at the "
                              f"budget's longest (max_prompt_tokens + 2 × max_completion_tokens), an upper bound")
    return StudyPlan(sweep=cfg.name, results=str(sweep.results), hardware=hardware, units=units,
                     parameters={s: {"parameters": n, "from": where} for s, (n, where) in pricer.parameters.items()},
                     approximations=approximations)


# ------------------------------------------------------------------------------------------------------------------
# output


def _flops(value: float) -> str:
    return "0" if not value else f"{value:.3g}"


def _hours(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def format_table(plan: StudyPlan) -> str:
    """The plan as a readable table, totals and the approximations below it."""
    hw = plan.hardware
    lines = [f"plan of sweep {plan.sweep} → {plan.results}",
             f"hardware {hw.name}: {hw.sustained_flops:.4g} FLOP/s sustained ({hw.source})",
             "parameters: " + "; ".join(f"{s} {v['parameters']:,} ({v['from']})" for s, v in plan.parameters.items()),
             ""]
    header = ["setting", "unit", "kind", "checkpoint", "tasks done", "train FLOPs", "score FLOPs", "hours", "to run (h)"]
    rows = []
    for u in plan.units:
        tasks = len(u.tasks_done) + len(u.tasks_to_run)
        done = f"{len(u.tasks_done)}/{tasks}" if tasks else "-"
        rows.append([u.setting, u.name, u.kind, u.checkpoint, done, _flops(u.train_flops), _flops(u.score_flops),
                     _hours(u.hours), _hours(u.remaining_hours)])
    total_train = sum(u.train_flops for u in plan.units)
    total_score = sum(u.score_flops for u in plan.units)
    rows.append(["total", f"{len(plan.units)} units", "", "", "", _flops(total_train), _flops(total_score),
                 _hours(hw.hours(plan.total_flops)), _hours(hw.hours(plan.remaining_flops))])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    right = {5, 6, 7, 8}

    def line(row):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines += [line(header), line(["-" * w for w in widths]), *map(line, rows[:-1]),
              line(["-" * w for w in widths]), line(rows[-1]), "",
              "hours = FLOPs / sustained FLOP/s / 3600 on one device; to run = what is not cached or recorded yet.",
              "Approximations:"]
    lines += [f"  - {a}" for a in plan.approximations]
    return "\n".join(lines)


def format_json(plan: StudyPlan) -> str:
    return json.dumps(plan.as_dict(), indent=1)
