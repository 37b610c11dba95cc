"""Run specs and score keys: what a unit of work *is*, built once from the config (HELM's ``RunSpec``).

* A **run spec** names one trained (or untouched starting) checkpoint: family, setting, the starting checkpoint's
  identity, the method with *every* hyperparameter (the bound constructor arguments, ``harness.run.registry``),
  the budget, the data, the feedback, the reward of an online method, and the seed. Its canonical JSON gives the
  ``run_id`` (which keys the checkpoint cache), and its **variant name** — the method plus what differs from the
  shipped defaults, e.g. ``dpo[beta=0.05,pairs=64]`` — labels its leaderboard row.
* A **score key** names one measurement of one checkpoint: the task, its version and config (subset, limits,
  judge), the evaluation settings it depends on (``eval_batch_size``; the held-out pairs' data split and truncation
  for tasks that read them), and the checkpoint's ``run_id``. Its ``measurement`` part (everything but the run id)
  says whether two rows were measured the same way; the leaderboard only compares rows whose measurements match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.identity import config_hash

START = "start"  # the method name of a setting's untouched starting checkpoint


@dataclass(frozen=True)
class RunSpec:
    """One unit of work. Frozen; ``identity`` is what the run id hashes, ``variant`` how the leaderboard names it."""

    family: str
    setting: str
    start: dict                               # the starting checkpoint: {"spec": ...} or a derived stage's identity
    method: str                               # a conf/method name, or "start"
    method_class: str | None = None           # module.Class of the adapter
    hyperparameters: dict = field(default_factory=dict)  # every constructor argument, bound with its default
    budget: dict | None = None
    data: dict | None = None
    seed: int | None = None
    reward: dict | None = None                # online methods: the reward they train against
    feedback: dict | None = None              # AI feedback: the judge that relabelled the pairs (None = human labels)
    sampler: str | None = None                # online methods sampling through vLLM: "vllm" (None = HF generate)
    variant: str = ""                         # readable row name, e.g. dpo[beta=0.05,pairs=64]

    @property
    def identity(self) -> dict:
        """The run config the run id hashes (the same shape records have carried as ``run_config``)."""
        if self.method == START:
            return {"family": self.family, "setting": self.setting, "start": self.start, "method": START}
        out = {"family": self.family, "setting": self.setting, "start": self.start, "method": self.method,
               "method_class": self.method_class, "hyperparameters": self.hyperparameters, "budget": self.budget,
               "data": self.data, "seed": self.seed}
        if self.reward is not None:
            out["reward"] = self.reward
        if self.feedback is not None:
            out["feedback"] = self.feedback
        if self.sampler is not None:
            out["sampler"] = self.sampler
        return out

    def canonical(self) -> str:
        return json.dumps(self.identity, sort_keys=True, default=str, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        return config_hash(self.identity)

    def with_hyperparameters(self, hyperparameters: dict, variant: str) -> "RunSpec":
        from dataclasses import replace

        return replace(self, hyperparameters=hyperparameters, variant=variant)


def variant_name(method: str, differences: dict[str, Any]) -> str:
    """``dpo`` or ``dpo[beta=0.05,pairs=64]``: the method plus what differs from the shipped defaults, sorted."""
    if not differences:
        return method
    return f"{method}[{','.join(f'{key}={_short(value)}' for key, value in sorted(differences.items()))}]"


def differences(values: dict, defaults: dict, prefix: str = "") -> dict[str, Any]:
    """Leaf keys whose value differs from ``defaults`` (nested dicts flattened as ``a.b``)."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, dict):
            out.update(differences(value, default, f"{prefix}{key}."))
        elif value != default:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


@dataclass(frozen=True)
class ScoreKey:
    """One measurement of one checkpoint; ``measurement_key`` leaves out the checkpoint."""

    task: str
    version: str
    config: dict                               # the task's resolved config (subset, limits, judge, prompts)
    evaluation: dict                           # the sweep settings its numbers depend on
    run_id: str

    @property
    def measurement(self) -> dict:
        return {"task": self.task, "version": self.version, "config": self.config, "evaluation": self.evaluation}

    @property
    def measurement_key(self) -> str:
        return config_hash(self.measurement)

    @property
    def value(self) -> str:
        return config_hash({**self.measurement, "run_id": self.run_id})

    @property
    def task_key(self) -> str:
        """What records key a (run, task) by: the task name and the score key (rescored when anything moves)."""
        return f"{self.task}-{self.value}"


def shipped_choices() -> dict[str, str]:
    """conf/sweep.yaml's default group choices ({"data": "hh-harmless", "feedback": "human", ...}): what a variant
    name need not mention."""
    from omegaconf import OmegaConf

    from harness.run.registry import CONF_DIR

    choices = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sweep.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                choices[key] = value
    return choices
