"""The two contracts of the harness: a training ``Method`` and a scoring ``Task``.

A method lives in ``methods/<name>.py`` with its config in ``conf/method/<name>.yaml``;
a task in ``tasks/<name>.py`` with ``conf/task/<name>.yaml``. The YAML's ``_target_``
names the class; the harness instantiates it with the YAML's remaining keys.
Nothing inherits behaviour: shared work lives in plain functions
(``harness.train.trl_support``, ``harness.evaluation``) — except the list methods, dataclasses deriving from one
base (``harness.train.listwise.ListMethod``) whose fields are the list options they all take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass
class TrainingJob:
    """Everything a method needs to train one run."""

    start_checkpoint: Path          # local HF model directory (policy init and reference)
    output_dir: Path                # write the trained model here (save_pretrained layout)
    plan: Any                       # harness.train.plan.TrainingPlan: rows (method's view, cut), held-out rows, steps,
    #                                 micro-batch, accumulation, visits — computed once by the sweep
    seed: int
    scratch_dir: Path               # for trainer state; deleted after the run
    reference_cache_dir: Path | None = None  # shared reference log-prob cache (content-addressed)
    reward: Any = None              # for methods with ``needs_reward = True``: a harness.train.rewards reward (see there)
    cache_root: Path | None = None  # the sweep's paths.cache: judges resolve their models here
    engine: str = "harness"        # online methods' sampling: harness / hf = HF generate, vllm = TRL's use_vllm (harness.evaluate.engines)

    @property
    def budget(self):
        """The budget as configured (harness.train.budget.Budget): lengths, optimizer, schedule, LoRA. Derived
        numbers — steps, accumulation, micro-batch, visits — are the plan's."""
        return self.plan.budget


@dataclass
class TrainingOutcome:
    """What a method reports back; the harness adds wall time and peak memory itself."""

    optimizer_steps: int
    examples: int                   # training examples consumed, in the method's own unit
    pairs: float                    # the same, counted in preference pairs (an unpaired example = 1/2 pair)
    policy_tokens: int              # tokens that went through forward+backward
    reference_tokens: int           # tokens scored forward-only by a frozen model
    curves: list[dict] = field(default_factory=list)  # per-logging-step metrics (loss, margins, ...)
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """A training technique.

    ``data_view`` chooses the view of the preference data the method trains on:
    ``pairs`` (prompt, chosen, rejected), ``unpaired`` (prompt, completion, label) or
    ``sft`` (prompt, completion from the chosen side).

    Optional attributes the harness reads: ``needs_reward`` (the job carries the sweep's reward),
    ``prompts_only`` (samples its own responses; the data's responses and labels are unused),
    ``forward_only_ratio`` and the cost-model hooks of ``harness.train.matching`` (``visit_cost``, ``run_cost``,
    ``visit_granularity``), the plan's (``harness.train.plan``): ``examples_per_pair``, ``updates_per_batch``, and
    ``parameter_ranges`` (a parameter whose range differs from what its name means elsewhere, ``harness.checks``).

    Hyperparameters are the constructor's arguments, declared once in its signature and documented by a comment in
    ``conf/method/<name>.yaml``: the registry binds every one of them into the run spec (``harness.run.spec``), so
    none can be left out of the run id, and checks each by its annotation and name before any work.
    """

    name: str
    data_view: str
    reference_based: bool

    def train(self, job: TrainingJob) -> TrainingOutcome: ...


@dataclass
class RewardContext:
    """What building a reward (``harness.train.rewards.build_reward``) may use: the sweep's data and budgets."""

    start_checkpoint: Path          # the setting's starting checkpoint (a reward model is initialized from it)
    train_pairs: list[dict]         # normalized preference pairs (harness.inputs.data schema)
    heldout_pairs: list[dict]
    budget: Any                     # the stage budget (harness.train.budget.Budget) for training a reward model
    cache_dir: Path                 # reward models are cached here by content hash
    device: str
    results_dir: Path               # where stage records/curves may be written


@dataclass
class Checkpoint:
    """A model ready to be scored."""

    path: Path                      # local HF model directory
    setting: str                    # pretrained | sft | instruct
    use_chat_template: bool         # instruct and sft checkpoints are prompted through their template
    chat_template_sha: str | None = None  # hash of the template text used, for the record
    reference_path: Path | None = None    # the run's starting checkpoint (None for the starting checkpoint itself)


@dataclass
class Metric:
    value: float
    stderr: float | None
    higher_is_better: bool


@dataclass
class TaskResult:
    metrics: dict[str, Metric]
    # One dict per scored item: inputs, outputs, and — for the leaderboard's paired bootstrap — an
    # ``item_id`` (stable across checkpoints) and ``scores`` {metric name: this item's contribution},
    # such that the metric's value is the mean of its per-item scores.
    samples: list[dict]
    details: dict = field(default_factory=dict)  # e.g. the exact prompt format / lm-eval config used


@runtime_checkable
class Task(Protocol):
    """A scoring task. ``version`` changes whenever its numbers could change."""

    name: str
    version: str

    def evaluate(self, checkpoint: Checkpoint, context: "TaskContext") -> TaskResult: ...


@dataclass
class TaskContext:
    data_mirror: Path | None        # local mirror folder, or None to read from the hub
    cache_dir: Path                 # scratch space for converted data files
    device: str
    batch_size: int
    show_progress: bool = True
    heldout_pairs: list[dict] | None = None  # the sweep's held-out preference pairs, truncated like training data
    cache_root: Path | None = None  # the sweep's paths.cache: judges resolve their models here
    engine: str = "harness"        # scoring / generation engine (harness.evaluate.engines): harness | hf | vllm


@dataclass
class ScoringEstimate:
    """What ``align-harness plan`` asks a task's optional ``scoring_cost(estimate) -> ScoringCost`` hook: the unit
    it prices (harness.run.pricing). Nothing is loaded; lengths are in the starting checkpoint's tokens."""

    is_start: bool                  # the setting's untouched starting checkpoint (method ``start``)
    chat_template: bool             # prompts go through a chat template (every setting but pretrained)
    heldout_lengths: list[tuple[int, int, int]] = field(default_factory=list)  # held-out pairs cut to the budget:
    #                                                                             (prompt, chosen, rejected) tokens


@dataclass(frozen=True)
class ScoringCost:
    """A task's scoring cost for one checkpoint, in tokens: FLOPs = 2·N·policy_tokens + 2·N_judge·judge_tokens."""

    policy_tokens: float            # forward-only tokens through the scored checkpoint: prompts, scored continuations,
    #                                 generated tokens (each decode step one token)
    judge_tokens: float = 0.0       # tokens through the judge / scorer model named by ``judge_model``
    judge_model: str | None = None  # a checkpoint spec (embedded:<name>, hub id, folder); None = no model judge, or
    #                                 one whose cost is not counted (an API)
    note: str = ""                  # the approximation made, one line
