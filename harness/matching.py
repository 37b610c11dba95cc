"""``budget.match``: hold examples, policy tokens or FLOPs equal across the methods of a sweep.

* ``examples`` (default): every method trains on the budget's ``pairs`` for ``epochs`` — the
  same pairs, the same optimizer steps.
* ``tokens``: each method gets as many pair visits (the same pairs, cycled) as it takes for its
  trained policy tokens to reach what a pair method (DPO) trains on the budget's pairs.
* ``flops``: the same for estimated FLOPs, (6 + 2·f)·N per trained token where f is the
  method's forward-only tokens per trained token (``forward_only_ratio``: DPO 1 — the reference
  scores the same tokens; KTO 3 — the reference on completions and on mismatched KL completions,
  and the policy's gradient-free KL pass; reference-free SimPO / ORPO / CPO / SFT 0). So under
  ``flops`` reference-free methods take more steps than DPO and KTO fewer.

The harness picks the number of pair visits before training from token counts of the rendered
sequences; what the run then *consumed* is counted from the trainer's own tokenized data and
recorded, so the match can be checked on the leaderboard.
"""

from __future__ import annotations

from dataclasses import replace

from harness.budget import Budget
from harness.logprobs import render

REFERENCE_PROFILE = ("pairs", 1.0)  # what a budget's pairs cost is measured in: a DPO-like pair method


def forward_only_ratio(method) -> float:
    return float(getattr(method, "forward_only_ratio", 1.0 if method.reference_based else 0.0))


def pair_lengths(rows: list[dict], tokenizer) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair, rendered as the trainers render them."""
    out = []
    for row in rows:
        prompt, chosen = render(tokenizer, row["prompt"], row["chosen"])
        _, rejected = render(tokenizer, row["prompt"], row["rejected"])
        out.append((len(prompt), len(chosen), len(rejected)))
    return out


def trained_tokens(view: str, lengths: tuple[int, int, int]) -> int:
    prompt, chosen, rejected = lengths
    return prompt + chosen if view == "sft" else 2 * prompt + chosen + rejected


def visit_cost(mode: str, view: str, ratio: float, lengths: tuple[int, int, int]) -> float:
    tokens = trained_tokens(view, lengths)
    return float(tokens) if mode == "tokens" else (6.0 + 2.0 * ratio) * tokens


def matched_visits(budget: Budget, method, lengths: list[tuple[int, int, int]]) -> int:
    """Pair visits (cycling the budget's pairs) that bring ``method``'s cost closest to the target."""
    if budget.match == "examples":
        return budget.pairs * budget.epochs
    reference_view, reference_ratio = REFERENCE_PROFILE
    target = budget.epochs * sum(visit_cost(budget.match, reference_view, reference_ratio, l) for l in lengths)
    view, ratio = method.data_view, forward_only_ratio(method)
    spent, visits = 0.0, 0
    while True:
        step = visit_cost(budget.match, view, ratio, lengths[visits % len(lengths)])
        if spent + step / 2 > target:  # stop where the next visit would overshoot more than it closes
            return max(visits, 1)
        spent += step
        visits += 1


def matched_training(budget: Budget, method, train_pairs: list[dict], tokenizer) -> tuple[Budget, list[dict], dict]:
    """The budget and pair list a method actually trains on, and a note for the record."""
    pairs = train_pairs[: budget.pairs]
    if budget.match == "examples":
        return budget, pairs, {"match": "examples"}
    visits = matched_visits(budget, method, pair_lengths(pairs, tokenizer))
    cycled = [pairs[i % len(pairs)] for i in range(visits)]
    note = {"match": budget.match, "pair_visits": visits, "epochs_equivalent": round(visits / len(pairs), 3)}
    return replace(budget, pairs=visits, epochs=1), cycled, note
