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
from dataclasses import asdict, dataclass, field

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
    precision: str
    match: str = "examples"
    lora: LoraSpec = field(default_factory=LoraSpec)

    @classmethod
    def from_config(cls, cfg) -> "Budget":
        values = dict(cfg)
        values["lora"] = LoraSpec(**dict(values.get("lora") or {}))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise HarnessError(f"budget.{sorted(unknown)[0]} is not a budget field; known: {', '.join(sorted(known))}")
        budget = cls(**values)
        budget.validate()
        return budget

    def validate(self) -> None:
        for name in ("pairs", "epochs", "max_prompt_tokens", "max_completion_tokens", "batch_pairs", "micro_batch_pairs"):
            if getattr(self, name) < 1:
                raise HarnessError(f"budget.{name}={getattr(self, name)} must be at least 1")
        if self.batch_pairs % self.micro_batch_pairs:
            raise HarnessError(
                f"budget.batch_pairs={self.batch_pairs} is not a multiple of budget.micro_batch_pairs={self.micro_batch_pairs}"
            )
        if self.match not in MATCH_MODES:
            raise HarnessError(f"budget.match={self.match!r}; choose one of {', '.join(MATCH_MODES)}")
        if self.precision not in PRECISIONS:
            raise HarnessError(f"budget.precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")

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

    def as_dict(self) -> dict:
        return asdict(self)


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
