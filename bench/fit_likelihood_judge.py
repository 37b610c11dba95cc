"""Fit and measure the ``likelihood`` judge (harness/evaluate/judges.py) on the mirror's GPT-4 annotations.

    python -m bench.fit_likelihood_judge [--evaluate 256] [--fit 512] [--features /tmp/features.json]

The annotated pairs in ``judge-check``'s order (``read_gpt4_annotations``: alpaca-7b #0, ppo-human #0, alpaca-7b #1,
...; two pairs per AlpacaEval instruction): the first ``--evaluate`` pairs are where agreement is reported (what
``align-harness judge-check --judge likelihood --limit <evaluate>`` reads), the next ``--fit`` pairs are where the
weights are fitted — other instructions, never the reported ones. Fit: logistic regression without intercept on the
feature differences f(output_1) − f(output_2), GPT-4's verdict as the label (draws left out), scikit-learn's
``LogisticRegression`` (L2, C = 1) on standardized differences, the weights mapped back to raw feature units.
Prints every candidate's agreement next to the constant and length baselines on the same pairs: one feature at a
time with the a-priori sign +1 (nothing fitted), combinations cross-fitted within the reported pairs (each half of the
instructions judged with weights fitted on the other half), and combinations fitted on the ``--fit`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from harness.evaluate.judges import (LIKELIHOOD_FEATURES, LikelihoodJudge, _label_of_annotation, judge_agreement,
                                     read_gpt4_annotations)
from harness.inputs.paths import atomic_write_text

CHUNK = 16  # pairs scored between two saves of the features file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", type=int, default=256, help="first pairs: agreement is reported on these")
    parser.add_argument("--fit", type=int, default=512, help="the next pairs: the weights are fitted on these")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--max-output-chars", type=int, default=1000)
    parser.add_argument("--features", type=Path, help="JSON file keeping the scored features between runs")
    parser.add_argument("--data-mirror", default=os.environ.get("ALIGN_HARNESS_DATA"))
    arguments = parser.parse_args()
    if arguments.evaluate % 2 or arguments.fit % 2:
        parser.error("--evaluate and --fit must be even: two annotated pairs per instruction keep the split by instruction")

    rows = read_gpt4_annotations(Path(arguments.data_mirror), arguments.evaluate + arguments.fit)
    evaluate, fit = rows[: arguments.evaluate], rows[arguments.evaluate:]
    assert not {r["instruction"] for r in evaluate} & {r["instruction"] for r in fit}, "split shares instructions"
    judge = LikelihoodJudge(arguments.model, max_output_chars=arguments.max_output_chars)
    if arguments.features and arguments.features.exists():
        judge.scored = {tuple(k): v for k, v in json.loads(arguments.features.read_text())}
    # scored in chunks, the reported pairs first, the features file saved after each chunk (a rerun picks up from it)
    for start in range(0, len(rows), CHUNK):
        judge.features([(r["instruction"], r[o]) for r in rows[start: start + CHUNK] for o in ("output_1", "output_2")])
        if arguments.features:
            atomic_write_text(arguments.features, json.dumps([[list(k), v] for k, v in judge.scored.items()]))

    # a priori signs, nothing fitted: more likely, more on topic, longer is better
    candidates = {f"{name} alone": {name: 1.0} for name in LIKELIHOOD_FEATURES}
    if fit:
        weights = fitted_weights(judge, fit)
        print(f"fitted on pairs {arguments.evaluate}..{arguments.evaluate + len(fit) - 1} "
              f"({len(fit) // 2} instructions): weights {json.dumps(weights)}")
        candidates["mean_logprob + mean_pmi (fitted, no length)"] = fitted_weights(judge, fit, ("mean_logprob", "mean_pmi"))
        candidates["all three (fitted)"] = weights
    for names in (LIKELIHOOD_FEATURES, ("mean_logprob", "mean_pmi"), ("mean_pmi", "log_chars")):
        print(f"{' + '.join(names):45s} evaluate pairs {len(evaluate):4d}  cross-fitted agreement "
              f"{cross_fitted_agreement(judge, evaluate, names):.3f} (each half of the instructions judged with weights "
              f"fitted on the other half)")
    for name, candidate in candidates.items():
        scorer = LikelihoodJudge(arguments.model, weights=candidate, max_output_chars=arguments.max_output_chars)
        scorer.scored, scorer._loaded = judge.scored, judge._loaded
        for split, pairs in (("evaluate", evaluate), ("fit", fit)) if fit else (("evaluate", evaluate),):
            result = judge_agreement(scorer, pairs, draw_margin=0.0)
            print(f"{name:45s} {split:8s} pairs {result['pairs']:4d}  agreement {result['agreement'][0]:.3f} ± "
                  f"{result['agreement'][1]:.3f}  baselines: always output_1 {result['baseline_always_reference']:.3f}, "
                  f"longer {result['baseline_longer_output']:.3f}  weights {json.dumps(candidate)}")


def cross_fitted_agreement(judge: LikelihoodJudge, rows: list[dict], names) -> float:
    """Agreement with GPT-4 on ``rows`` when the instructions of even AlpacaEval index are judged with weights fitted on
    the odd ones and vice versa: every verdict out of sample (``judge_agreement``'s rule: a draw on one side counts ½)."""
    agreements = []
    for parity in (0, 1):
        judged = [r for r in rows if r["index"] % 2 == parity]
        weights = fitted_weights(judge, [r for r in rows if r["index"] % 2 != parity], names)
        scorer = LikelihoodJudge(judge.spec, weights=weights, max_output_chars=judge.max_output_chars)
        scorer.scored, scorer._loaded = judge.scored, judge._loaded
        result = judge_agreement(scorer, judged, draw_margin=0.0)
        agreements.append((result["agreement"][0], result["pairs"]))
    return sum(a * n for a, n in agreements) / sum(n for _, n in agreements)


def fitted_weights(judge: LikelihoodJudge, rows: list[dict], names=LIKELIHOOD_FEATURES) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labelled = [(r, _label_of_annotation(r["preference"])) for r in rows]
    labelled = [(r, label) for r, label in labelled if label in ("1", "2")]
    first = judge.features([(r["instruction"], r["output_1"]) for r, _ in labelled])
    second = judge.features([(r["instruction"], r["output_2"]) for r, _ in labelled])
    x = np.array([[a[n] - b[n] for n in names] for a, b in zip(first, second)])
    y = np.array([1 if label == "1" else 0 for _, label in labelled])
    scale = x.std(axis=0)
    # antisymmetric: each pair also swapped, so the fit has no reason for an intercept or a position prior
    model = LogisticRegression(fit_intercept=False, C=1.0).fit(np.vstack([x / scale, -x / scale]), np.concatenate([y, 1 - y]))
    return {n: round(float(w / s), 4) for n, w, s in zip(names, model.coef_[0], scale)}


if __name__ == "__main__":
    main()
