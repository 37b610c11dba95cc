"""DNO — Direct Nash Optimization, its practical iterative form DNO-Prct (Rosset et al. 2024, "Direct Nash
optimization: teaching language models to self-improve with general preferences", arXiv:2404.03715, Algorithm 2).

Each round t = 1..``rounds`` on a fresh chunk of the budget's prompts (the round loop of ``methods/iterative_dpo.py``,
``harness.train.rounds.train_in_rounds``):

1. **sample** K = ``samples`` responses per prompt from the current policy π_t; the data's chosen response joins them
   as the gold candidate (``include_chosen``; the paper's teacher output, "student vs. teacher" pairs);
2. **preference oracle** over the K (+1) candidates: P[i][j] = P(y_i ≻ y_j | x), from the sweep's reward through a
   Bradley–Terry link σ(r_i − r_j), or from a pairwise judge (``judge:``, a ``harness.evaluate.judges`` config, both
   orders averaged) — ``harness.train.oracles``, as ``sppo``;
3. **rank** the candidates by DNO's reward, the expected win rate against the current policy
   r_t(x, y) = E_{y'~π_t} P(y ≻ y' | x), estimated by the row means of P (``mean_win_probabilities``); the best is
   y⁺, the worst y⁻;
4. **large-margin filter**: keep the pair only when r_t(x, y⁺) − r_t(x, y⁻) ≥ ``margin`` (``large_margin_pairs``).
   Departure: the paper filters on the margin of its GPT-4 annotator's scores; the harness applies the same filter to
   the oracle's estimated win rates, a [0, 1] scale;
5. **contrastive update** from π_t with the reference = π_t: the DPO loss (TRL ``DPOTrainer``, ``loss_type=sigmoid``)
   L = −log σ(β·log π(y⁺|x)/π_t(y⁺|x) − β·log π(y⁻|x)/π_t(y⁻|x)) — Algorithm 2's regression objective in its
   practical logistic form.

Every round runs and the last is kept (DNO's monotonic improvement; no held-out stopping rule). A round whose filter
leaves no pair ends the loop early (the first one: an error naming ``margin``). A budget with fewer than
``rounds × budget.batch_pairs`` prompts trains as many rounds as it holds (``rounds_planned`` vs ``rounds_done``).

**Budget** and **tokens / FLOPs** as ``iterative_dpo`` (policy-parameter equivalents, see ``methods/ppo.py``): the DPO
rounds' own counts plus, forward-only, generation tokens (K samples per prompt) and the oracle's reading — the reward's
tokens × N_reward/N over the K (+1) candidates, or a local judge's tokens × N_judge/N (all (K+1)K/2 pairs in both
orders). ``visit_cost`` and ``visit_granularity`` are the same sums per prompt for ``budget.match=tokens|flops``
(``harness.train.matching``; a judge estimated as policy-sized).
"""

from __future__ import annotations

import json

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.oracles import mean_win_probabilities, preference_oracle, self_play_outcome
from harness.train.pairwise import PairwiseRound


def large_margin_pairs(prompts: list, candidates: list[list[str]], matrices,
                       margin: float) -> tuple[list[dict], dict]:
    """DNO-Prct's pair construction (Rosset et al. 2024, Algorithm 2, steps 4–5): per prompt, the candidates' expected
    win rates r(y) = (1/n) Σ_j P[y][j] (the row means of the oracle's n×n matrix, diagonal ½ included); the best y⁺ and
    the worst y⁻ make a pair when r(y⁺) − r(y⁻) ≥ ``margin`` (a prompt whose candidates all tie gives none).
    Returns the pairs and counts: ``ties`` (no preference), ``filtered`` (below the margin), ``margins`` (kept pairs')."""
    from harness.train.rounds import best_and_worst

    pairs, ties, filtered, margins = [], 0, 0, []
    for prompt, texts, matrix in zip(prompts, candidates, matrices):
        wins = mean_win_probabilities(matrix)
        picked = best_and_worst(wins)
        if picked is None:
            ties += 1
            continue
        gap = wins[picked[0]] - wins[picked[1]]
        if gap < margin:
            filtered += 1
            continue
        pairs.append({"prompt": prompt, "chosen": texts[picked[0]], "rejected": texts[picked[1]]})
        margins.append(gap)
    return pairs, {"ties": ties, "filtered": filtered, "margins": margins}


class DNO:
    data_view = "pairs"        # the prompts, and the chosen response as the gold candidate (include_chosen)
    reference_based = True

    def __init__(self, name: str = "dno", rounds: int = 3, samples: int = 5, include_chosen: bool = True,
                 margin: float = 0.0, beta: float = 0.1, learning_rate: float = 5e-7, temperature: float = 0.7,
                 judge: dict | None = None):
        from harness.evaluate.judges import checked_judge_config
        from harness.train.rounds import check_rounds

        if samples < 1:
            raise HarnessError(f"{name}: samples={samples} must be at least 1 (conf/method/{name}.yaml)")
        if not 0.0 <= margin < 1.0:
            raise HarnessError(f"{name}: margin={margin} is a gap of win rates: set it in [0, 1) (conf/method/{name}.yaml)")
        check_rounds(name, rounds, samples + int(include_chosen))  # at least two candidates a prompt
        self.name = name
        self.rounds = rounds
        self.samples = samples
        self.include_chosen = include_chosen
        self.margin = margin
        self.beta = beta
        self.learning_rate = learning_rate
        self.temperature = temperature
        self.judge = checked_judge_config(judge, f"method_params.{name}.judge")
        self.needs_reward = self.judge is None  # the oracle is the sweep's reward unless a judge is named

    @property
    def candidates(self) -> int:
        return self.samples + int(self.include_chosen)

    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One prompt in its round: K samples generated, the K (+1 gold) candidates read by the oracle (the reward:
        each sequence × N_reward/N; a judge: every pair in both orders, estimated as a policy-sized local judge), then
        one (y⁺, y⁻) pair trained and scored by the round's reference. Filtered prompts make it cheaper."""
        from harness.train.rounds import judged_visit_tokens

        sequence = prompt_tokens + completion_tokens
        generated = self.samples * sequence
        oracle = (self.candidates * sequence * sizes.reward_share if self.judge is None
                  else judged_visit_tokens(self.candidates, prompt_tokens, completion_tokens))
        return 2.0 * sequence, generated + oracle + 2.0 * sequence

    def visit_granularity(self, budget) -> tuple[int, int]:
        from harness.train.rounds import rounds_granularity

        return rounds_granularity(self.rounds, budget)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.rounds import Sampler, round_seed, train_in_rounds

        oracle = preference_oracle(self.judge, job, self.name)
        sampler = Sampler(job.plan, self.temperature, engine=job.engine)
        gold = {json.dumps(row["prompt"], sort_keys=True): row["chosen"] for row in job.plan.rows}

        def label(path, prompts: list, round_number: int) -> tuple[list[dict], dict]:
            texts = sampler.samples(path, prompts, self.samples, seed=round_seed(job.seed, round_number, self.samples))
            if self.include_chosen:
                texts = [[*samples, gold[json.dumps(prompt, sort_keys=True)]] for prompt, samples in zip(prompts, texts)]
            pairs, counts = large_margin_pairs(prompts, texts, oracle.matrices(prompts, texts), self.margin)
            if not pairs and round_number == 1:
                raise HarnessError(f"{self.name}: no pair of round 1 passed the margin filter ({counts['ties']} tied, "
                                   f"{counts['filtered']} below margin={self.margin}); lower "
                                   f"+method_params.{self.name}.margin")
            margins = counts["margins"]
            return pairs, {"filtered": counts["filtered"], "mean_margin": sum(margins) / len(margins) if margins else None,
                           **oracle.round_statistics()}

        # a budget too small for every round (budget.pairs < rounds × batch_pairs, e.g. budget=micro) trains fewer
        # rounds of budget.batch_pairs prompts each, recorded as rounds_planned vs rounds_done
        affordable = max(1, min(self.rounds, len(job.plan.rows) // job.budget.batch_pairs))
        rounds = train_in_rounds(job, name=self.name, rounds=affordable, label=label,
                                 round_method=PairwiseRound(beta=self.beta, learning_rate=self.learning_rate))
        return self_play_outcome(rounds, sampler, oracle, {
            "rounds_planned": self.rounds, "round_filtered": [h["filtered"] for h in rounds.trained],
            "round_mean_margins": [h["mean_margin"] for h in rounds.trained]})
