"""Budgets: what every method in a sweep gets, identically, and what a run actually consumed.

A budget is ``conf/budget/<name>.yaml``. The effective batch is counted in preference pairs;
a method on the ``unpaired`` view gets two examples per pair, so it takes the same number of
optimizer steps over the same pairs as DPO does. A budget is what was configured and is never rewritten;
what a run derives from it (visits, optimizer steps, micro-batch, accumulation, cut rows) is its training plan,
``harness.train.plan.plan_training``.

FLOPs are estimated the usual way (Kaplan et al. 2020): 6·N per trained token (forward and
backward) and 2·N per forward-only token (reference scoring), N = the policy's parameter count.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field

from harness.checks import Range, check_bool, check_choice, check_int, check_number, check_str
from harness.errors import HarnessError

MATCH_MODES = ("examples", "tokens", "flops")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass(frozen=True)
class Budget:
    name: str
    pairs: int                      # training preference pairs drawn from the train split
    epochs: int
    max_prompt_tokens: int
    max_completion_tokens: int
    batch_pairs: int                # effective batch, in pairs (= micro batch × accumulation × devices)
    micro_batch_pairs: int          # pairs per device per forward pass
    optimizer: str
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    precision: str                  # fp32 | bf16 | fp16 | auto (harness.train.plan.resolved_precision)
    match: str = "examples"
    activation_checkpointing: bool = True  # recompute activations in the backward pass (transformers' gradient
    #                                        checkpointing, TRL trainers): ~1/3 more compute for far less activation
    #                                        memory. TRL's default; the small budgets turn it off
    lora: LoraSpec = field(default_factory=LoraSpec)
    learning_rates: Mapping = field(default_factory=dict)  # method name (or ``all``) -> learning rate under this
    #                                   budget, in place of the method YAML's (the papers' rates, set for 7B models);
    #                                   method_params still win. {} = every method's own rate

    @classmethod
    def from_config(cls, cfg, key: str = "budget") -> "Budget":
        """A budget from its config (``key`` = the config key it sits under: budget or stage_budget), checked."""
        values = dict(cfg)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise HarnessError(f"{key}.{sorted(unknown)[0]} is not a budget field; known: {', '.join(sorted(known))}")
        missing = [f for f, spec in cls.__dataclass_fields__.items() if f not in values and spec.default is MISSING
                   and spec.default_factory is MISSING]
        if missing:
            raise HarnessError(f"{key}.{missing[0]} is missing; set it (conf/budget/micro.yaml shows every field)")
        lora = values.get("lora") or {}
        if not isinstance(lora, Mapping):
            raise HarnessError(f"{key}.lora={lora!r} must be a mapping; write {key}.lora.enabled=true etc.")
        lora_fields = set(LoraSpec.__dataclass_fields__)
        if set(lora) - lora_fields:
            raise HarnessError(f"{key}.lora.{sorted(set(lora) - lora_fields)[0]} is not a LoRA field; known: "
                               f"{', '.join(sorted(lora_fields))}")
        values["lora"] = LoraSpec(**dict(lora))
        rates = values.get("learning_rates") or {}
        if not isinstance(rates, Mapping):
            raise HarnessError(f"{key}.learning_rates={rates!r} must be a mapping of method name (or all) to a learning "
                               f"rate, e.g. {{all: 1.0e-4, sft: 2.0e-5}}")
        values["learning_rates"] = dict(rates)
        budget = cls(**values)
        budget.validate(key)
        return budget

    def validate(self, key: str = "budget") -> None:
        """Every field's type and range (one line naming ``<key>.<field>``), then how fields fit together."""
        for name in ("pairs", "epochs", "max_prompt_tokens", "max_completion_tokens", "batch_pairs", "micro_batch_pairs"):
            check_int(f"{key}.{name}", getattr(self, name), minimum=1)
        check_int(f"{key}.seed", self.seed, minimum=0)
        check_number(f"{key}.warmup_ratio", self.warmup_ratio, Range(0, 1, below=True))
        check_number(f"{key}.weight_decay", self.weight_decay, Range(0))
        check_number(f"{key}.max_grad_norm", self.max_grad_norm, Range(0, above=True))
        for name in ("name", "optimizer", "lr_scheduler"):
            check_str(f"{key}.{name}", getattr(self, name))
        check_choice(f"{key}.match", self.match, MATCH_MODES)
        check_choice(f"{key}.precision", self.precision, PRECISIONS)
        check_bool(f"{key}.activation_checkpointing", self.activation_checkpointing)
        check_bool(f"{key}.lora.enabled", self.lora.enabled)
        check_int(f"{key}.lora.r", self.lora.r, minimum=1)
        check_number(f"{key}.lora.alpha", self.lora.alpha, Range(0, above=True))
        check_number(f"{key}.lora.dropout", self.lora.dropout, Range(0, 1, below=True))
        if not (isinstance(self.lora.target_modules, str) and self.lora.target_modules) and not (
                isinstance(self.lora.target_modules, Sequence) and all(isinstance(m, str) for m in self.lora.target_modules)):
            raise HarnessError(f"{key}.lora.target_modules={self.lora.target_modules!r} must be all-linear or a list "
                               f"of module names, e.g. [q_proj,v_proj]")
        for method, rate in self.learning_rates.items():
            check_str(f"{key}.learning_rates (a method name)", method)
            check_number(f"{key}.learning_rates.{method}", rate, Range(0, above=True))
        if self.batch_pairs % self.micro_batch_pairs:
            raise HarnessError(
                f"{key}.batch_pairs={self.batch_pairs} is not a multiple of {key}.micro_batch_pairs={self.micro_batch_pairs}"
            )

    def check_fits(self, train_pairs: int, data_name: str) -> None:
        if self.pairs > train_pairs:
            raise HarnessError(
                f"budget {self.name}: budget.pairs={self.pairs} but {data_name} has only {train_pairs} training pairs; "
                f"lower budget.pairs"
            )
        if self.batch_pairs > self.pairs:
            raise HarnessError(
                f"budget {self.name}: budget.batch_pairs={self.batch_pairs} exceeds budget.pairs={self.pairs}; "
                f"no full optimizer step fits"
            )

    def learning_rate_for(self, method: str) -> float | None:
        """This budget's learning rate for ``method`` (its own entry, else ``all``), or None: the method's own."""
        rate = self.learning_rates.get(method, self.learning_rates.get("all"))
        return None if rate is None else float(rate)

    def method_overrides(self, method: str) -> dict:
        """What this budget sets in ``method``'s arguments: ``{learning_rate: ...}`` or nothing. The sweep applies it
        below ``method_params`` (the command line wins)."""
        rate = self.learning_rate_for(method)
        return {} if rate is None else {"learning_rate": rate}

    def as_dict(self) -> dict:
        values = asdict(self)
        if not values["learning_rates"]:  # budgets without it keep their run ids
            del values["learning_rates"]
        return values


def training_flops(parameters: int, policy_tokens: int, reference_tokens: int) -> float:
    """6·N per trained token + 2·N per forward-only token."""
    return 6.0 * parameters * policy_tokens + 2.0 * parameters * reference_tokens


class ResourceMeter:
    """Measures wall seconds and peak memory of a block of work.

    Peak memory is the highest resident set size of this process sampled every 0.2 s during the
    block (CPU), or ``torch.cuda.max_memory_allocated`` on a GPU, in MiB.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.wall_seconds = 0.0
        self.peak_memory_mib = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "ResourceMeter":
        import psutil
        import torch

        self._process = psutil.Process(os.getpid())
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        import torch

        self.wall_seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        if self._cuda:
            self.peak_memory_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_memory_mib = max(self._peak_rss, self._process.memory_info().rss) / 2**20
