"""Held-out preference accuracy: does the checkpoint's implicit reward rank the human-chosen
response above the rejected one, on pairs kept out of training?

Metrics (``harness.logprobs.preference_accuracy``), each ± standard error over pairs:

* ``logratio_accuracy`` — r = log π(y|x) − log π_start(y|x), the implicit reward of DPO-style
  methods (Rafailov et al. 2023, eq. 5); defined for trained runs, not the starting checkpoint;
* ``avg_logp_accuracy`` — r = mean per-token log π(y|x), the reward SimPO optimizes (Meng et al.
  2024, eq. 4); defined for every checkpoint, so the starting row is a baseline.

The starting checkpoint's log-probs are cached on disk by content, so every method of a setting
pays for them once.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.logprobs import pair_logps, preference_accuracy
from harness.paths import atomic_write_text
from harness.protocols import Checkpoint, Metric, TaskContext, TaskResult
from harness.records import config_hash


def _model_identity(path: Path) -> dict:
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {"path": str(path.resolve()), "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


def cached_pair_logps(path: Path, pairs: list[dict], cache_dir: Path, *, batch_size: int, device: str) -> list[dict]:
    key = config_hash({"model": _model_identity(path), "pairs": pairs})
    cache_file = cache_dir / "pair_logps" / f"{key}.json"
    if cache_file.exists():
        return json.loads(cache_file.read_text())
    scored = pair_logps(path, pairs, batch_size=batch_size, device=device)
    atomic_write_text(cache_file, json.dumps(scored))
    return scored


class HeldoutPreference:
    def __init__(self, name: str = "heldout_preference", version: str = "1", limit: int | None = 64):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise HarnessError(f"{name}: limit={limit!r} must be a positive number of pairs, or null for all")
        self.name, self.version, self.limit = name, str(version), limit

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        if not context.heldout_pairs:
            raise HarnessError(f"{self.name}: the sweep passed no held-out preference pairs; set data.heldout_pairs > 0")
        pairs = context.heldout_pairs[: self.limit]
        policy = cached_pair_logps(checkpoint.path, pairs, context.cache_dir, batch_size=context.batch_size,
                                   device=context.device)
        reference = None
        if checkpoint.reference_path is not None:
            reference = cached_pair_logps(checkpoint.reference_path, pairs, context.cache_dir,
                                          batch_size=context.batch_size, device=context.device)
        scores = preference_accuracy(policy, reference)
        metrics = {f"{kind}_accuracy": Metric(value, stderr, higher_is_better=True)
                   for kind, (value, stderr, _) in scores.items()}
        samples = []
        for index, (pair, scored) in enumerate(zip(pairs, policy)):
            sample = {"index": index, "source_row": pair.get("source_row"), "prompt": pair["prompt"],
                      "chosen": pair["chosen"], "rejected": pair["rejected"], **scored}
            if reference is not None:
                sample.update({f"reference_{k}": v for k, v in reference[index].items()})
            sample.update({f"{kind}_correct": outcomes[index] for kind, (_, _, outcomes) in scores.items()})
            sample["item_id"] = str(pair.get("source_row", index))
            sample["scores"] = {f"{kind}_accuracy": outcomes[index] for kind, (_, _, outcomes) in scores.items()}
            samples.append(sample)
        return TaskResult(metrics=metrics, samples=samples,
                          details={"pairs": len(pairs), "reference": str(checkpoint.reference_path) if reference else None})
