"""Win rate: pairwise LLM-as-judge on AlpacaEval instructions against a reference (AlpacaEval, Li et al. 2023).

The checkpoint answers the first ``limit`` AlpacaEval instructions in file order (greedy by default,
``max_new_tokens`` new tokens, through its chat template when it has one: ``harness.evaluate.generation``).
A judge (``harness.evaluate.judges``; default: the embedded SmolLM2-135M-Instruct reading the "1"/"2" label
logits, both presentation orders averaged) compares each output with the reference's output to the
same instruction. References (``reference``):

* ``start`` (default) — the run's starting checkpoint's own outputs, generated the same way from
  ``checkpoint.reference_path`` and cached on disk by (checkpoint identity, instructions, generation
  config), so every method of a setting pays for them once. For the starting checkpoint itself
  (``reference_path`` None) the reference *is* its own outputs: the win rate is 0.5 by definition
  and nothing is judged (the row still generates, which fills the cache for the methods after it,
  and reports output lengths); ``details.note`` says so.
* ``davinci003`` — text-davinci-003's outputs from the AlpacaEval release (the mirror's
  ``alpaca_eval/text_davinci_003/model_outputs.json``, or the hub's ``tatsu-lab/alpaca_eval``).
* ``dataset_chosen`` is not offered: the AlpacaEval instructions have no preference-data "chosen"
  responses, and judging on the HH prompts instead would make it a different task.

An output identical to its reference is a draw without asking the judge.

Metrics (per-item scores in each sample's ``scores``; each value is the mean of its item scores):

* ``win_rate`` — share of items whose output the judge prefers, a draw counting half; a judgment is
  a draw when |p − 0.5| ≤ ``draw_margin``. ± standard error as AlpacaEval (ddof = 1).
* ``length_controlled_win_rate`` — AlpacaEval 2's length-controlled win rate (Dubois et al. 2024,
  arXiv:2404.04475) with its ``length_controlled_minimal`` GLM, the variant without the instruction-difficulty
  term (precomputed on AlpacaEval's hub data, not in the mirror) and without the regularization towards "gamed"
  baselines of the default ``length_controlled_v1``: logit P(win) = θ + φ·tanh(Δ / sd(Δ)), Δ = reference chars
  − output chars, fitted to the item scores as soft labels by L1-penalized logistic regression (liblinear,
  θ penalized too, C cross-validated over 5 item folds) exactly as ``alpaca_eval/metrics/glm_winrate.py``;
  the rate is σ(θ), the prediction at equal lengths (``length_controlled_fit`` has the recipe). Per item the
  score is σ(θ) + (y − mean y) − (ŷ − mean ŷ), whose mean is σ(θ); its standard error treats θ and φ as fixed.
  Fewer than 5 items, no length variation or one score for every item: nothing is fitted and the raw scores
  are kept. On a few dozen items cross-validation often picks the smallest C, where θ = φ = 0 and the rate is
  exactly 0.5: it is a large-sample correction. ``details.length_control`` records θ, φ and C.
* ``mean_output_chars`` / ``mean_reference_chars`` — mean lengths in characters (AlpacaEval's unit);
  ``higher_is_better: false`` only so that the leaderboard never rewards verbosity; not primary.
* ``position_consistency`` — share of judged items where both presentation orders name the same
  winner: a property of the judge on these outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError, SkipRun
from harness.evaluate.judges import (DEFAULT_JUDGE_MODEL, JUDGE_CHECK_PAIRS, Judgment, build_judge, cached_judge_check,
                                     preference_label, win_rate_from_preferences)
from harness.inputs.cache import build_once, read_checked_json, write_checked_json
from harness.protocols import Checkpoint, Metric, ScoringCost, ScoringEstimate, TaskContext, TaskResult
from harness.identity import config_hash
from harness.evaluate.task_support import limit_fits, whole_number

REFERENCES = ("start", "davinci003")
# AlpacaEval's length_controlled_minimal fit (length_controlled_fit): cross-validation folds, size of the C grid
# (log-spaced 1e-4..1e4, LogisticRegressionCV's default) and liblinear's seed, as alpaca_eval/metrics/glm_winrate.py
LENGTH_CONTROL_FOLDS = 5
LENGTH_CONTROL_CS = 10
LENGTH_CONTROL_SEED = 123


class WinRate:
    """The ``win_rate`` task; constructed from ``conf/task/win_rate.yaml``."""

    def __init__(
        self,
        name: str = "win_rate",
        version: str = "2",
        limit: int | None = 16,
        reference: str = "start",
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        draw_margin: float = 0.0,
        judge: dict | None = None,
        judge_check_pairs: int | None = JUDGE_CHECK_PAIRS,
        mirror_file: str = "alpaca_eval/text_davinci_003/model_outputs.json",
        hub_id: str = "tatsu-lab/alpaca_eval",
        hub_config: str = "alpaca_eval",
        hub_split: str = "eval",
    ) -> None:
        whole_number(name, "limit", limit, optional=True, unit="instructions")
        if reference not in REFERENCES:
            raise HarnessError(f"{name}: reference={reference!r} is not offered; available: {', '.join(REFERENCES)}")
        whole_number(name, "max_new_tokens", max_new_tokens, unit="tokens")
        whole_number(name, "judge_check_pairs", judge_check_pairs, minimum=0, optional=True)
        if isinstance(draw_margin, bool) or not isinstance(draw_margin, (int, float)) or not 0 <= draw_margin < 0.5:
            raise HarnessError(f"{name}: draw_margin={draw_margin!r} must be a number in [0, 0.5)")
        self.name, self.version, self.limit, self.reference = name, str(version), limit, reference
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample),
                           "temperature": float(temperature), "seed": int(seed)}
        self.draw_margin = float(draw_margin)
        self.judge_config = dict(judge or {"type": "local_hf"})
        self.judge_check_pairs = judge_check_pairs
        self.mirror_file, self.hub_id, self.hub_config, self.hub_split = mirror_file, hub_id, hub_config, hub_split
        self._judge = build_judge(self.judge_config, config_key=f"task_params.{name}.judge")  # checks the config now
        self._judge_key = ("cpu", 8)

    INSTRUCTIONS = 805         # AlpacaEval, scored when limit is null
    INSTRUCTION_TOKENS = 37    # measured, SmolLM2 tokenizer: mean of the 805 instructions
    CHAT_TOKENS = 30           # measured: SmolLM2's chat template around one user turn
    JUDGE_PROMPT_TOKENS = 61   # measured: JUDGE_PROMPT (harness.evaluate.judges) without its three fields
    DAVINCI_OUTPUT_TOKENS = 68  # measured: text-davinci-003's outputs, cut to 1,000 characters, at 4.18 characters a token
    CHARS_PER_TOKEN = 4.18     # measured: SmolLM2 tokenizer on the first 200 text-davinci-003 outputs

    def scoring_cost(self, estimate: ScoringEstimate) -> ScoringCost:
        """``align-harness plan``: ``max_new_tokens`` decoded per instruction (greedy small models rarely stop early),
        then, unless this is the start row against its own outputs, the judge reads every pair in both orders (one
        forward pass each: instruction, two outputs each cut to ``max_output_chars``, the judging prompt). The start
        row's outputs, every trained row's reference, are generated once per setting and counted on the start row."""
        items = self.INSTRUCTIONS if self.limit is None else min(self.limit, self.INSTRUCTIONS)
        new = self.generation["max_new_tokens"]
        policy = items * (self.INSTRUCTION_TOKENS + (self.CHAT_TOKENS if estimate.chat_template else 0) + new)
        if estimate.is_start and self.reference == "start":
            return ScoringCost(policy_tokens=policy, note=f"{items} instructions × {new} generated; not judged")
        cap = self.judge_config.get("max_output_chars")
        cut = float("inf") if cap is None else cap / self.CHARS_PER_TOKEN  # the judge's cut, in tokens
        reference = new if self.reference == "start" else self.DAVINCI_OUTPUT_TOKENS
        judged = 2 * items * (self.JUDGE_PROMPT_TOKENS + self.CHAT_TOKENS + self.INSTRUCTION_TOKENS + min(new, cut)
                              + min(reference, cut))
        judge_type = self.judge_config.get("type", "local_hf")
        model = None if judge_type == "openai_api" else self.judge_config.get("model", DEFAULT_JUDGE_MODEL)
        return ScoringCost(policy_tokens=policy, judge_tokens=judged if model else 0.0, judge_model=model,
                           note=f"{items} instructions × {new} generated; {2 * items} judgments"
                                + ("" if model else " by an API (not counted)"))

    def evaluate(self, checkpoint: Checkpoint, context: TaskContext) -> TaskResult:
        started = time.perf_counter()
        rows, source = self._read_rows(context.data_mirror)
        limit_fits(self.name, self.limit, len(rows), source, "instructions")
        rows = rows[: self.limit]
        instructions = [row["instruction"] for row in rows]
        outputs = self._generations(checkpoint.path, checkpoint.use_chat_template, instructions, context, "outputs")
        generated = time.perf_counter()
        details = {"reference": self.reference, "source": source, "instructions": len(rows), "limit": self.limit,
                   "generation": self.generation, "chat_template": bool(checkpoint.use_chat_template),
                   "judge": self._judge.identity(), "draw_margin": self.draw_margin, "length_unit": "characters"}

        if self.reference == "davinci003":
            references = [row["output"] for row in rows]
        elif checkpoint.reference_path is None:  # the starting checkpoint against itself
            details["note"] = ("start row: the reference is this checkpoint's own outputs, so the win rate is 0.5 by "
                               "definition; nothing was judged")
            samples = [self._sample(index, instruction, output, output, None) for index, (instruction, output)
                       in enumerate(zip(instructions, outputs))]
            details["seconds"] = {"generation": round(generated - started, 1), "judging": 0.0}
            metrics = self._metrics(samples, judged=False, details=details)
            return TaskResult(metrics=metrics, samples=samples, details=details)
        else:
            references = self._generations(checkpoint.reference_path, checkpoint.use_chat_template, instructions,
                                           context, "reference outputs")
            details["reference_checkpoint"] = str(checkpoint.reference_path)

        referenced = time.perf_counter()
        details["judge_check"] = self._judge_check(context)  # what the leaderboard marks the column by
        checked = time.perf_counter()
        judge = self._judge_for(context)
        to_judge = [k for k in range(len(rows)) if outputs[k] != references[k]]
        judged = judge.judge_batch([(instructions[k], outputs[k], references[k]) for k in to_judge]) if to_judge else []
        judgments = dict(zip(to_judge, judged))
        samples = [self._sample(k, instructions[k], outputs[k], references[k], judgments.get(k)) for k in range(len(rows))]
        details["identical_outputs"] = len(rows) - len(to_judge)
        details["seconds"] = {"generation": round(generated - started, 1),
                              "reference_generation": round(referenced - generated, 1),
                              "judge_check": round(checked - referenced, 1),
                              "judging": round(time.perf_counter() - checked, 1)}
        metrics = self._metrics(samples, judged=True, details=details)
        return TaskResult(metrics=metrics, samples=samples, details=details)

    # ------------------------------------------------------------------------------------------
    def _judge_check(self, context: TaskContext) -> dict:
        """The judge's agreement with GPT-4 and the better baseline on the first ``judge_check_pairs`` annotated pairs
        (``harness.evaluate.judges.cached_judge_check``: computed once per judge and kept in the harness cache), or
        ``unchecked`` with the reason. The leaderboard marks the column by it (``harness.report.board``). Only judged
        rows check: the start row against itself asks no judge."""
        import torch

        # the check is cached per judge and annotation file: always in fp32, whatever the sweep's eval_precision
        with torch.autocast(device_type=str(context.device).split(":")[0], enabled=False):
            return cached_judge_check(self._judge_for(context), data_mirror=context.data_mirror,
                                      cache_root=context.cache_root or context.cache_dir, pairs=self.judge_check_pairs,
                                      draw_margin=self.draw_margin)

    def _judge_for(self, context: TaskContext):
        """The judge on the context's device and batch size; built once and kept (its model stays loaded)."""
        key = (context.device, context.batch_size, context.cache_root)
        if key != self._judge_key:
            self._judge = build_judge(self.judge_config, device=context.device, batch_size=context.batch_size,
                                      config_key=f"task_params.{self.name}.judge", cache_dir=context.cache_root)
            self._judge_key = key
        return self._judge

    def _sample(self, index: int, instruction: str, output: str, reference: str, judgment: Judgment | None) -> dict:
        """One item; the judge is asked (instruction, output, reference), so its probability is P(output better)."""
        if judgment is None:  # identical outputs: a draw without asking
            p, first, second, method, raw, consistent = 0.5, 0.5, 0.5, "identical", {}, None
        else:
            p, first, second = judgment.probability, judgment.output_1_first, judgment.output_1_second
            method, raw, consistent = judgment.method, judgment.raw, judgment.consistent(self.draw_margin)
        # AlpacaEval's coding, output_1 = the reference: "2" the checkpoint's output wins, "1" the reference's, "0" a draw.
        preference = {"1": "2", "2": "1", "0": "0"}[preference_label(p, self.draw_margin)]
        sample = {
            "item_id": str(index),
            "instruction": instruction,
            "output": output,
            "reference_output": reference,
            "p_output_better": p,                        # both orders averaged
            "p_output_better_output_first": first,      # output shown as "Response 1"
            "p_output_better_output_second": second,    # output shown as "Response 2"
            "judge_method": method,
            "judge_raw": raw,
            "preference": preference,
            "position_consistent": consistent,           # None when not judged
            "output_chars": len(output),
            "reference_chars": len(reference),
        }
        sample["scores"] = {"win_rate": {"2": 1.0, "1": 0.0, "0": 0.5}[preference],
                            "mean_output_chars": float(len(output)), "mean_reference_chars": float(len(reference))}
        if consistent is not None:
            sample["scores"]["position_consistency"] = float(consistent)
        return sample

    def _metrics(self, samples: list[dict], *, judged: bool, details: dict) -> dict[str, Metric]:
        """The metrics of ``samples``; the length-control fit (θ, φ, C) goes into ``details``."""
        outcome = win_rate_from_preferences([s["preference"] for s in samples])
        scores = [s["scores"]["win_rate"] for s in samples]
        lengths = [s["output_chars"] for s in samples], [s["reference_chars"] for s in samples]
        controlled = scores
        if judged:
            fit = length_controlled_fit(scores, *lengths)
            controlled = fit.scores
            details["length_control"] = fit.summary()
        for sample, value in zip(samples, controlled):
            sample["scores"]["length_controlled_win_rate"] = value
        metrics = {
            "win_rate": Metric(outcome.value, outcome.stderr if judged else 0.0, higher_is_better=True),
            "length_controlled_win_rate": Metric(_mean(controlled), _stderr(controlled) if judged else 0.0, True),
            "mean_output_chars": Metric(_mean(lengths[0]), _stderr(lengths[0]), higher_is_better=False),
            "mean_reference_chars": Metric(_mean(lengths[1]), _stderr(lengths[1]), higher_is_better=False),
        }
        consistency = [s["scores"]["position_consistency"] for s in samples if "position_consistency" in s["scores"]]
        if consistency:
            metrics["position_consistency"] = Metric(_mean(consistency), _stderr(consistency), higher_is_better=True)
        return metrics

    def _generations(self, path: Path, use_chat_template: bool, instructions: list[str], context: TaskContext,
                     what: str) -> list[str]:
        """Outputs of the checkpoint at ``path``, cached by (checkpoint identity, instructions, generation config);
        the batch size is not part of the key: greedy outputs do not depend on it."""
        key = config_hash({"model": model_identity(path), "chat_template": bool(use_chat_template),
                           "instructions": instructions, "generation": self.generation, "prompt_format": "format_prompt/1",
                           "engine": context.engine})
        cache_file = Path(context.cache_dir) / "win_rate_generations" / f"{key}.json"
        def cached() -> list[str] | None:
            found = read_checked_json(cache_file, "win-rate outputs")  # a checked file (harness.inputs.cache)
            return None if found is None else found["outputs"]

        # the reference's outputs are shared by every unit of a fanned-out sweep: generated once (build_once)
        return build_once(cache_file, "win-rate outputs", cached,
                          lambda: self._generate(path, use_chat_template, instructions, context, what, cache_file))

    def _generate(self, path: Path, use_chat_template: bool, instructions: list[str], context: TaskContext, what: str,
                  cache_file: Path) -> list[str]:
        from harness.inputs.tokenizer_cache import load_tokenizer

        from harness.evaluate.engines import generator
        from harness.evaluate.generation import format_prompt

        tokenizer = load_tokenizer(path)
        prompts = [format_prompt(tokenizer, [{"role": "user", "content": text}], use_chat_template) for text in instructions]
        generate = generator(path, engine=context.engine, device=context.device, batch_size=context.batch_size)
        outputs = generate(prompts, progress=f"{self.name}: {what}" if context.show_progress else None, **self.generation)
        del generate
        write_checked_json(cache_file, {"model": str(path), "outputs": outputs})
        return outputs

    def _read_rows(self, data_mirror: Path | None) -> tuple[list[dict], str]:
        """AlpacaEval's 805 instructions with text-davinci-003's outputs, in file order."""
        if data_mirror is not None:
            path = Path(data_mirror) / self.mirror_file
            if not path.is_file():
                raise HarnessError(f"AlpacaEval file {path} not found; set data_mirror=<folder with {self.mirror_file}> "
                                   f"(or the ALIGN_HARNESS_DATA environment variable)")
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise HarnessError(f"{path}: not valid JSON ({error}); restore the file from the AlpacaEval release") from None
            source = str(path)
        else:
            source = f"hub:{self.hub_id}/{self.hub_config}/{self.hub_split}"
            try:
                import datasets

                rows = [dict(row) for row in datasets.load_dataset(self.hub_id, self.hub_config, split=self.hub_split)]
            except Exception as error:  # offline, renamed, script-based: all mean "not here"
                raise SkipRun(f"AlpacaEval data {source} is not available here ({type(error).__name__}); "
                              f"set data_mirror=<folder> or ALIGN_HARNESS_DATA to a local mirror") from None
        if not isinstance(rows, list):
            raise HarnessError(f"{source}: expected a JSON list of {{instruction, output}} rows")
        for index, row in enumerate(rows):
            for field in ("instruction", "output"):
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise HarnessError(f"{source}: row {index}: field {field!r} is missing or not text")
        return rows, source


def model_identity(path: Path) -> dict:
    """A checkpoint folder's identity for caching: path and weight files (name, size, mtime)."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {"path": str(path.resolve()), "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


@dataclass
class LengthControlledFit:
    """AlpacaEval 2's ``length_controlled_minimal`` GLM fitted to one model's items (see the module docstring)."""

    value: float                  # σ(θ): the predicted win rate at equal lengths (AlpacaEval's LC win rate / 100)
    scores: list[float]           # per item: value + (y − mean y) − (ŷ − mean ŷ); their mean is ``value``
    intercept: float | None       # θ, the coefficient of the model's column of ones (L1-penalized like the slope)
    length_slope: float | None    # φ, the coefficient of tanh((reference chars − output chars) / length_sd)
    C: float | None               # inverse L1 strength chosen by cross-validation
    length_sd: float              # sample standard deviation (ddof = 1) of reference chars − output chars
    note: str | None = None       # why nothing was fitted (the scores are then returned unchanged)

    def summary(self) -> dict:
        return {"intercept": self.intercept, "length_slope": self.length_slope, "C": self.C,
                "length_sd_chars": self.length_sd, "note": self.note}


def length_controlled_fit(scores: list[float], output_lengths: list[int],
                          reference_lengths: list[int]) -> LengthControlledFit:
    """AlpacaEval 2's ``length_controlled_minimal`` (``alpaca_eval/metrics/glm_winrate.py``: GLM_INFO,
    ``_get_featurized_data``, ``fit_LogisticRegressionCV``), written here with scikit-learn:

    * y = item score in [0, 1] (preference − 1, a draw ½); Δ = reference chars − output chars (AlpacaEval's
      len(output_1) − len(output_2), output_1 being the reference); x = tanh(Δ / sd(Δ)), sd with ddof = 1;
    * logit P(win) = θ·1 + φ·x with no separate intercept: θ is the model's own column and is penalized;
    * soft labels as AlpacaEval: each item twice, label 1 with weight y and label 0 with weight 1 − y;
    * L1 penalty, liblinear, random_state 123; C from 10 values log-spaced over 1e-4..1e4 (LogisticRegressionCV's
      default grid) by 5-fold GroupKFold over items (both copies of an item in one fold), scored by the soft-label
      log loss on the held-out items (predictions clipped to [1e-15, 1 − 1e-15]); best = lowest summed loss;
      then refitted on every item with that C;
    * the length-controlled win rate is the prediction at Δ = 0: σ(θ), the same for every item.

    Per item the score is σ(θ) + (y − mean y) − (ŷ − mean ŷ), ŷ = σ(θ + φx): the item's outcome minus the part its
    length predicts, centred so that the mean is exactly σ(θ) (the penalized θ does not make the residuals sum to 0).
    Their standard error treats θ and φ as fixed. Returned unchanged, with a ``note``, where the recipe is undefined
    or degenerate: fewer items than folds; Δ the same for every item (sd = 0: AlpacaEval would divide by zero);
    every item with the same score (all wins, say: AlpacaEval's fit gives the raw rate within ~1e-4).
    """
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    y = np.asarray(scores, dtype=float)
    n = len(y)
    if not np.all((y >= 0) & (y <= 1)):
        raise HarnessError("length control needs item scores in [0, 1] (no missing preferences)")
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(output_lengths, dtype=float)
    sd = float(delta.std(ddof=1)) if n > 1 else 0.0
    unchanged = dict(value=float(y.mean()) if n else math.nan, scores=[float(v) for v in y], intercept=None,
                     length_slope=None, C=None, length_sd=sd)
    if n < LENGTH_CONTROL_FOLDS:
        return LengthControlledFit(**unchanged, note=f"{n} items: fewer than the {LENGTH_CONTROL_FOLDS} "
                                                     f"cross-validation folds; not fitted")
    if sd == 0.0:
        return LengthControlledFit(**unchanged, note="every output differs from its reference by the same length; "
                                                     "nothing to control for")
    if np.all(y == y[0]):  # liblinear would see one class; AlpacaEval's fit lands within ~1e-4 of the raw rate
        return LengthControlledFit(**unchanged, note="every item has the same score; nothing to control for")
    x = np.tanh(delta / sd)
    features = np.column_stack([np.ones(n), x])
    rows = np.vstack([features, features])                       # each item twice: as a win and as a loss
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    weights = np.concatenate([y, 1.0 - y])
    items = np.concatenate([np.arange(n), np.arange(n)])

    def fit(c: float, keep):
        model = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", fit_intercept=False,
                                   random_state=LENGTH_CONTROL_SEED)
        with warnings.catch_warnings(), _stderr_silenced():
            warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear's 100-iteration cap (AlpacaEval's too)
            return model.fit(rows[keep], labels[keep], sample_weight=weights[keep])

    grid = np.logspace(-4, 4, LENGTH_CONTROL_CS)
    folds = list(GroupKFold(n_splits=LENGTH_CONTROL_FOLDS).split(rows, labels, groups=items))
    losses = np.zeros(len(grid))
    for train, test in folds:
        target = y[items[test]]                                  # both copies of a held-out item carry its y
        for k, c in enumerate(grid):
            predicted = np.clip(fit(c, train).predict_proba(rows[test])[:, 1], 1e-15, 1 - 1e-15)
            losses[k] += -np.mean(target * np.log(predicted) + (1 - target) * np.log(1 - predicted))
    best = float(grid[int(np.argmin(losses))])
    theta, phi = (float(w) for w in fit(best, slice(None)).coef_[0])
    value = _sigmoid(theta)
    fitted = 1.0 / (1.0 + np.exp(-(theta + phi * x)))
    per_item = value + (y - y.mean()) - (fitted - fitted.mean())
    return LengthControlledFit(value=value, scores=[float(v) for v in per_item], intercept=theta, length_slope=phi,
                               C=best, length_sd=sd)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: liblinear's C code prints "WARNING: class label ... not found" there when a
    training fold holds only wins or only losses (the zero-weight copies are dropped); the fit itself is right."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def length_controlled_scores(scores: list[float], output_lengths: list[int],
                             reference_lengths: list[int]) -> list[float]:
    """Per-item length-controlled win scores (``length_controlled_fit``); their mean is the controlled win rate."""
    return length_controlled_fit(scores, output_lengths, reference_lengths).scores


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _stderr(values) -> float | None:
    values = list(values)
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
