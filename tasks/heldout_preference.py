"""Held-out preference accuracy: does the checkpoint's implicit reward rank the human-chosen
response above the rejected one, on pairs kept out of training?

Metrics (``harness.evaluate.logprobs.preference_accuracy``), each ± standard error over pairs:

* ``logratio_accuracy`` — r = log π(y|x) − log π_start(y|x), the implicit reward of DPO-style
  methods (Rafailov et al. 2023, eq. 5); defined for trained runs, not the starting checkpoint;
* ``avg_logp_accuracy`` — r = mean per-token log π(y|x), the reward SimPO optimizes (Meng et al.
  2024, eq. 4); defined for every checkpoint, so the starting row is a baseline.

The starting checkpoint's log-probs are cached on disk by content, so every method of a setting
pays for them once.

**Binary feedback** (``harness.inputs.data``, ``format: binary``): the held-out rows are examples
``{prompt, completion, label}`` with no pairs. The same two metrics are then ranking accuracies over
every (desirable, undesirable) pair of held-out examples — the share in which the desirable one's
implicit reward is higher, ties half (``binary_ranking_accuracy``: the area under the ROC curve,
Mann-Whitney U / (n_D·n_U)), which on examples split from pairs would compare across prompts too.
``limit`` then counts examples.
"""

from __future__ import annotations

import math

from harness.errors import HarnessError
from harness.inputs.data import is_binary
from harness.evaluate.logprobs import cached_example_logps, cached_pair_logps, preference_accuracy
from harness.protocols import Checkpoint, Metric, ScoringCost, ScoringEstimate, TaskContext, TaskResult
from harness.evaluate.task_support import whole_number


def binary_ranking_accuracy(scores: list[float], labels: list[bool]) -> tuple[float, float, list[float]]:
    """Share of (desirable, undesirable) pairs with score(desirable) > score(undesirable), ties counting half: the
    area under the ROC curve A = U / (n_D·n_U) (Mann-Whitney U). Standard error by Hanley & McNeil (1982):
    SE² = [A(1 − A) + (n_D − 1)(Q1 − A²) + (n_U − 1)(Q2 − A²)] / (n_D·n_U), Q1 = A/(2 − A), Q2 = 2A²/(1 + A).

    Per-example outcomes (for the leaderboard's paired bootstrap): a desirable example's share of undesirable ones
    it beats, an undesirable example's share of desirable ones that beat it; their mean over all examples is A.
    """
    desirable = [s for s, label in zip(scores, labels) if label]
    undesirable = [s for s, label in zip(scores, labels) if not label]
    n_d, n_u = len(desirable), len(undesirable)
    if not n_d or not n_u:
        raise HarnessError(f"held-out binary feedback has {n_d} desirable and {n_u} undesirable examples; ranking "
                           f"accuracy needs both: raise data.heldout_examples or the task's limit")

    def beats(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    outcomes = [sum(beats(s, u) for u in undesirable) / n_u if label else sum(beats(d, s) for d in desirable) / n_d
                for s, label in zip(scores, labels)]
    area = sum(sum(beats(d, u) for u in undesirable) for d in desirable) / (n_d * n_u)
    q1, q2 = area / (2 - area), 2 * area ** 2 / (1 + area)
    variance = (area * (1 - area) + (n_d - 1) * (q1 - area ** 2) + (n_u - 1) * (q2 - area ** 2)) / (n_d * n_u)
    return area, math.sqrt(max(variance, 0.0)), outcomes


class HeldoutPreference:
    reads_heldout_pairs = True  # its numbers depend on the sweep's held-out split and truncation (the score key has them)

    def __init__(self, name: str = "heldout_preference", version: str = "1", limit: int | None = 64):
        whole_number(name, "limit", limit, optional=True, unit="pairs")
        self.name, self.version, self.limit = name, str(version), limit

    def scoring_cost(self, estimate: ScoringEstimate) -> ScoringCost:
        """``align-harness plan``: the first ``limit`` held-out pairs, prompt + chosen and prompt + rejected, through the
        policy; the reference's log-probs (trained rows) are the start row's, cached per setting, counted there."""
        pairs = estimate.heldout_lengths[: self.limit]
        tokens = sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in pairs)
        return ScoringCost(policy_tokens=tokens, note=f"{len(pairs)} pairs, 2 sequences each")

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        if not context.heldout_pairs:
            raise HarnessError(f"{self.name}: the sweep passed no held-out preference pairs; set data.heldout_pairs > 0")
        if is_binary(context.heldout_pairs):
            return self.evaluate_binary(checkpoint, context)
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

    def evaluate_binary(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        """Held-out binary feedback: ranking accuracy of the implicit reward (see the module docstring)."""
        examples = context.heldout_pairs[: self.limit]
        options = dict(batch_size=context.batch_size, device=context.device)
        policy = cached_example_logps(checkpoint.path, examples, context.cache_dir, **options)
        rewards = {"avg_logp": [p["logp"] / max(p["tokens"], 1) for p in policy]}
        reference = None
        if checkpoint.reference_path is not None:
            reference = cached_example_logps(checkpoint.reference_path, examples, context.cache_dir, **options)
            rewards["logratio"] = [p["logp"] - r["logp"] for p, r in zip(policy, reference)]
        labels = [example["label"] for example in examples]
        scores = {kind: binary_ranking_accuracy(values, labels) for kind, values in rewards.items()}
        metrics = {f"{kind}_accuracy": Metric(value, stderr, higher_is_better=True)
                   for kind, (value, stderr, _) in scores.items()}
        samples = []
        for index, (example, scored) in enumerate(zip(examples, policy)):
            sample = {"index": index, "source_row": example.get("source_row"), "prompt": example["prompt"],
                      "completion": example["completion"], "label": example["label"], **scored}
            if reference is not None:
                sample.update({f"reference_{k}": v for k, v in reference[index].items()})
            sample["item_id"] = str(example.get("source_row", index))
            sample["scores"] = {f"{kind}_accuracy": outcomes[index] for kind, (_, _, outcomes) in scores.items()}
            samples.append(sample)
        return TaskResult(metrics=metrics, samples=samples,
                          details={"examples": len(examples), "desirable": sum(labels),
                                   "undesirable": len(labels) - sum(labels), "accuracy": "ranking (AUC) over "
                                   "desirable × undesirable held-out examples, Hanley & McNeil standard error",
                                   "reference": str(checkpoint.reference_path) if reference else None})
