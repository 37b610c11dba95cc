"""``budget.match``: hold examples, policy tokens or FLOPs equal across the methods of a sweep.

* ``examples`` (default): every method trains on the budget's ``pairs`` for ``epochs`` — the
  same pairs, the same optimizer steps.
* ``tokens``: each method gets as many pair visits (the same pairs, cycled) as it takes for its
  trained policy tokens to reach what a pair method (DPO) trains on the budget's pairs.
* ``flops``: the same for estimated FLOPs, 6·N per trained token + 2·N per forward-only token.

The target is always what a DPO-like pair method consumes on the budget's pairs, ``epochs`` times:
trained tokens 2·prompt + chosen + rejected per pair, as many forward-only (reference) tokens.

**Offline methods** price a pair visit from the pair's rendered lengths: (6 + 2·f)·N per trained
token, f the method's forward-only tokens per trained token (``forward_only_ratio``: DPO 1 — the
reference scores the same tokens; KTO 3 — the reference on completions and on mismatched KL
completions, and the policy's gradient-free KL pass; reference-free SimPO / ORPO / CPO / SFT 0). So
under ``flops`` reference-free methods take more steps than DPO and KTO fewer. Their match is exact
up to one pair visit (the sweep's tests hold it within 5%).

**Online methods** (PPO, RLOO, GRPO, online DPO, iterative DPO) train on the prompts only, and most
of their cost is not in the pairs at all: they generate, score with a reward model, PPO runs a value
model and several epochs per rollout, RLOO / GRPO sample k completions per prompt. Such a method
prices a *prompt visit* itself with the hook

    visit_cost(prompt_tokens, completion_tokens, budget, sizes) -> (trained_tokens, forward_only_tokens)

in policy-parameter equivalents (a token through a model of N' parameters counts N'/N;
``methods/ppo.py``), mirroring exactly how the method adds up its consumed counts after training.
The matcher calls it with the pair's rendered prompt length and ``completion_tokens =
budget.max_completion_tokens``: **the estimate assumes every sample runs to the length cap**, which is
what small and random models usually do (they rarely sample EOS early). A policy that stops earlier
consumes less than its target; the record says by how much. Two optional hooks:

* ``run_cost(prompt_tokens, completion_tokens, budget, sizes, heldout_prompts)`` — a fixed cost per
  run, not per visit (iterative DPO's held-out greedy evaluations, ``heldout_prompts`` = the held-out
  prompts available); it is taken off the target before visits are counted;
* ``visit_granularity(budget) -> (minimum, multiple)`` — the fewest prompt visits the method can train
  on and the step they come in (RLOO / GRPO: whole generation batches of ``budget.batch_pairs``;
  iterative DPO: at least ``budget.batch_pairs`` per round, a multiple of ``rounds``). When the target
  buys fewer visits than the minimum, the method gets the minimum and the note records
  ``match_met: false`` with the estimated ratio — the run goes on rather than stopping the sweep.

Model sizes (``ModelSizes``) come from the sweep: the starting checkpoint's parameters (the policy,
N), the reward's (``harness.train.rewards``: 0 for a programmatic reward) and whether the reward model reads
the policy's tokens (then PPO starts its value model from it). An online method without ``visit_cost``
is priced like an offline pair method (``cost_model: pairs`` in the note) — far too cheap.

What the online estimate leaves out, and so what the ``match_ratio`` shows: completions that end
before the cap, prompts rendered a few tokens differently by a trainer than by ``pair_lengths``, the
reward model's own tokenization of prompt + completion, iterative DPO's early stop and tied samples
(no pair, no DPO step), the chat template's end-of-turn tokens in iterative DPO's DPO rounds, and
whole-batch granularity (up to half a batch's cost). The sweep's test holds online methods within 15%
of the target when completions hit the cap (``tests/test_online_matching.py``).

The harness picks the number of visits before training; what the run then *consumed* is counted by
the method itself and recorded with the match's quality: ``match_target`` (the target, in FLOPs or
policy tokens), ``match_estimate`` (the pre-training estimate / target) and ``match_ratio``
(consumed / target), so the match can be checked on the leaderboard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness.train.budget import Budget, training_flops
from harness.inputs.data import budget_rows, is_binary, lists_for_pairs, ranked
from harness.errors import HarnessError
from harness.evaluate.logprobs import render

REFERENCE_PROFILE = ("pairs", 1.0)  # what a budget's pairs cost is measured in: a DPO-like pair method


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts a cost model needs; costs are counted in policy-parameter equivalents."""

    policy: int = 1                         # N: the starting checkpoint's (= the trained policy's) parameters
    reward: int = 0                         # N_reward: the reward model's parameters (0 for a programmatic reward)
    reward_reads_policy_tokens: bool = False  # the reward model's tokenizer is the policy's (PPO's value model
    #                                           starts from it then)

    @property
    def reward_share(self) -> float:
        """N_reward / N: what one reward-model token costs in policy tokens."""
        return self.reward / self.policy

    @classmethod
    def of(cls, start: Path, reward=None, tokenizer=None) -> "ModelSizes":
        """The sizes of a run starting at ``start`` with ``reward`` (a ``harness.train.rewards`` reward or None)."""
        from harness.train.rewards import parameter_count

        policy = parameter_count(start)
        if not policy:  # weights not in safetensors: count the architecture's parameters without allocating them
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(start))
            policy = sum(p.numel() for p in model.parameters())
        reads_policy_tokens = False
        if reward is not None and getattr(reward, "path", None) is not None and tokenizer is not None:
            from harness.inputs.tokenizer_cache import load_tokenizer

            reads_policy_tokens = load_tokenizer(reward.path).get_vocab() == tokenizer.get_vocab()
        return cls(policy=policy, reward=int(getattr(reward, "parameters", 0) or 0),
                   reward_reads_policy_tokens=reads_policy_tokens)


@dataclass(frozen=True)
class MatchPlan:
    """How many visits a method gets, and what they are estimated to cost against the target (in units of N)."""

    visits: int
    target: float | None = None      # per unit of N: 6·trained + 2·forward-only tokens (flops) or trained tokens
    estimate: float | None = None
    met: bool = True                 # False when the method's minimum visits cost more than the target
    cost_model: str = "pairs"        # "pairs" (rendered pair lengths) or "method" (the method's visit_cost)


def forward_only_ratio(method) -> float:
    return float(getattr(method, "forward_only_ratio", 1.0 if method.reference_based else 0.0))


def pair_lengths(rows: list[dict], tokenizer) -> list[tuple[int, ...]]:
    """(prompt, chosen, rejected) token counts of each pair, rendered as the trainers render them; of a list row
    (``harness.inputs.data``) (prompt, response 1, ..., response K), best response first."""
    out = []
    for row in rows:
        if "responses" in row:
            texts = ranked(row)["responses"]
        else:
            texts = [row["chosen"], row["rejected"]]
        rendered = [render(tokenizer, row["prompt"], text) for text in texts]
        out.append((len(rendered[0][0]), *(len(completion) for _, completion in rendered)))
    return out


def trained_tokens(view: str, lengths: tuple[int, ...]) -> int:
    """Trained tokens of one visit. A list (``lists`` view) trains K·prompt + Σ responses; a pair method on a list
    of K is priced as its K − 1 adjacent pairs (best ≻ second, ...), which is how a list counts in the budget."""
    prompt, *completions = lengths
    if view == "sft":
        return prompt + completions[0]
    if view == "lists":
        return len(completions) * prompt + sum(completions)
    return sum(2 * prompt + better + worse for better, worse in zip(completions, completions[1:]))


def price(mode: str, trained: float, forward_only: float) -> float:
    """A cost in units of N: trained tokens (``tokens``) or 6·trained + 2·forward-only FLOPs per parameter (``flops``)."""
    return float(trained) if mode == "tokens" else 6.0 * trained + 2.0 * forward_only


def pair_visit_cost(view: str, ratio: float, lengths: tuple[int, int, int]) -> tuple[float, float]:
    """(trained, forward-only) tokens of one pair visit of an offline method."""
    tokens = trained_tokens(view, lengths)
    return float(tokens), ratio * tokens


def visit_cost(mode: str, view: str, ratio: float, lengths: tuple[int, int, int]) -> float:
    return price(mode, *pair_visit_cost(view, ratio, lengths))


def plan_visits(budget: Budget, method, lengths: list[tuple[int, int, int]], sizes: ModelSizes | None = None,
                heldout_prompts: int = 0) -> MatchPlan:
    """Visits (cycling the budget's pairs) that bring ``method``'s estimated cost closest to the target."""
    if budget.match == "examples":  # list lengths (prompt + K responses): the lists the budget's pairs buy
        per_pass = lists_for_pairs(budget.pairs, len(lengths[0]) - 1) if len(lengths[0]) > 3 else budget.pairs
        return MatchPlan(visits=per_pass * budget.epochs)
    mode, sizes = budget.match, sizes or ModelSizes()
    reference_view, reference_ratio = REFERENCE_PROFILE
    target = budget.epochs * sum(visit_cost(mode, reference_view, reference_ratio, l) for l in lengths)
    hook = getattr(method, "visit_cost", None)
    completion = budget.max_completion_tokens  # online samples estimated at the cap (see the module docstring)
    if hook is not None:
        costs = [price(mode, *hook(l[0], completion, budget, sizes)) for l in lengths]
    else:
        view, ratio = method.data_view, forward_only_ratio(method)
        costs = [visit_cost(mode, view, ratio, l) for l in lengths]
    fixed = 0.0
    if getattr(method, "run_cost", None) is not None:
        mean_prompt = round(sum(l[0] for l in lengths) / len(lengths))
        fixed = price(mode, *method.run_cost(mean_prompt, completion, budget, sizes, heldout_prompts))
    minimum, multiple = method.visit_granularity(budget) if hasattr(method, "visit_granularity") else (1, 1)
    minimum = multiple * math.ceil(max(minimum, 1) / multiple)

    def cost_of(visits: int) -> float:
        return fixed + sum(costs[i % len(costs)] for i in range(visits))

    spent, visits = fixed, 0
    while True:
        block = sum(costs[(visits + i) % len(costs)] for i in range(multiple))
        if block <= 0 or spent + block / 2 > target:  # stop where the next block would overshoot more than it closes
            break
        spent += block
        visits += multiple
    met = visits >= minimum
    visits = max(visits, minimum)
    return MatchPlan(visits=visits, target=target, estimate=cost_of(visits), met=met,
                     cost_model="method" if hook is not None else "pairs")


def matched_visits(budget: Budget, method, lengths: list[tuple[int, int, int]], sizes: ModelSizes | None = None,
                   heldout_prompts: int = 0) -> int:
    """Pair (or prompt) visits that bring ``method``'s cost closest to the target (``plan_visits``)."""
    return plan_visits(budget, method, lengths, sizes, heldout_prompts).visits


def matched_training(budget: Budget, method, train_pairs: list[dict], tokenizer, sizes: ModelSizes | None = None,
                     heldout_prompts: int = 0) -> tuple[list[dict], int, dict]:
    """The pair list a method trains on, the passes it makes over them, and a note for the record.

    The budget is not changed: ``examples`` gives its pairs for ``budget.epochs`` passes, ``tokens`` / ``flops``
    the pairs cycled to the matched visits for one pass (``harness.train.plan.plan_training`` calls this)."""
    # Binary feedback (harness.inputs.data): budget.pairs = P buys its first 2·P examples, an unpaired example being half a
    # pair, so ``examples`` matching holds as on pairs (KTO: same steps). The tokens / flops targets are a pair
    # method's cost on the budget's pairs, which binary data do not have: the sweep refuses them up front.
    pairs = budget_rows(train_pairs, budget.pairs)
    if budget.match == "examples":
        return pairs, budget.epochs, {"match": "examples"}
    if is_binary(pairs):
        raise HarnessError(f"budget.match={budget.match} needs preference pairs; binary feedback data take "
                           f"budget.match=examples")
    sizes = sizes or ModelSizes()
    plan = plan_visits(budget, method, pair_lengths(pairs, tokenizer), sizes, heldout_prompts)
    visits = plan.visits  # list rows: list visits (a list of K = K − 1 pairs, harness.inputs.data)
    cycled = [pairs[i % len(pairs)] for i in range(visits)]
    scale = sizes.policy if budget.match == "flops" else 1  # FLOPs = N × the cost in units of N
    note = {"match": budget.match, "pair_visits": visits, "epochs_equivalent": round(visits / len(pairs), 3),
            "cost_model": plan.cost_model, "match_target": plan.target * scale,
            "match_estimate": round(plan.estimate / plan.target, 4), "match_met": plan.met}
    if not plan.met:
        note["match_problem"] = (f"{getattr(method, 'name', 'method')} needs at least {visits} prompt visits, estimated "
                                 f"at {plan.estimate / plan.target:.2f}× the {budget.match} target; raise budget.pairs")
    return cycled, 1, note


def match_quality(consumed: dict) -> dict:
    """``match_ratio`` = consumed / ``match_target`` (FLOPs, or policy tokens under ``tokens``), for the record."""
    if consumed.get("match") not in ("tokens", "flops") or not consumed.get("match_target"):
        return {}
    key = "flops" if consumed["match"] == "flops" else "policy_tokens"
    return {"match_ratio": round(consumed[key] / consumed["match_target"], 4)}


def reward_model_flops(parameters: int, budget: Budget, lengths: list[tuple[int, int, int]], heldout: int,
                       normalize_pairs: int = 256) -> float:
    """The cost model of a Bradley-Terry reward model (``harness.train.rewards``): trained on prompt + chosen and prompt + rejected of the
    budget's pairs for its epochs, then scoring the chosen of up to ``normalize_pairs`` pairs and ``heldout`` pairs."""
    trained = budget.epochs * sum(2 * p + c + r for p, c, r in lengths)
    scored = sum(p + c for p, c, _ in lengths[:normalize_pairs]) + heldout * (
        sum(2 * p + c + r for p, c, r in lengths) / len(lengths))
    return training_flops(parameters, trained, scored)
