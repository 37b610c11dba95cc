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
* ``length_controlled_win_rate`` — AlpacaEval 2's length debiasing (Dubois et al. 2024,
  arXiv:2404.04475), simplified: a logistic regression of the item score y ∈ {0, ½, 1} on
  tanh(Δ / sd(Δ)), Δ = output chars − reference chars, fitted with soft labels; the controlled win
  rate is its prediction at Δ = 0, σ(intercept). AlpacaEval's GLM also has a per-instruction
  difficulty term (precomputed on its hub data, not in the mirror) and regularizes towards "gamed"
  baseline models; both are left out, and the slope's L2 strength is fixed (C = 1) instead of
  cross-validated. Per item the score is y − ŷ + σ(intercept), whose mean is
  σ(intercept) (the unpenalized intercept's normal equation); its standard error treats the fitted
  slope as fixed. It is a large-sample correction: on a few dozen items it is mostly noise.
* ``mean_output_chars`` / ``mean_reference_chars`` — mean lengths in characters (AlpacaEval's unit);
  ``higher_is_better: false`` only so that the leaderboard never rewards verbosity; not primary.
* ``position_consistency`` — share of judged items where both presentation orders name the same
  winner: a property of the judge on these outputs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from harness.errors import HarnessError, SkipRun
from harness.evaluate.judges import Judgment, build_judge, preference_label, win_rate_from_preferences
from harness.inputs.paths import atomic_write_text
from harness.protocols import Checkpoint, Metric, TaskContext, TaskResult
from harness.identity import config_hash
from harness.evaluate.task_support import limit_fits, whole_number

REFERENCES = ("start", "davinci003")
LENGTH_CONTROL_C = 1.0  # inverse L2 strength on the length slope: scikit-learn's default C (AlpacaEval picks C by
                        # 5-fold CV over 805 items; with the few items here a weak penalty lets two points swing it)


class WinRate:
    """The ``win_rate`` task; constructed from ``conf/task/win_rate.yaml``."""

    def __init__(
        self,
        name: str = "win_rate",
        version: str = "1",
        limit: int | None = 16,
        reference: str = "start",
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        draw_margin: float = 0.0,
        judge: dict | None = None,
        mirror_file: str = "alpaca_eval/text_davinci_003/model_outputs.json",
        hub_id: str = "tatsu-lab/alpaca_eval",
        hub_config: str = "alpaca_eval",
        hub_split: str = "eval",
    ) -> None:
        whole_number(name, "limit", limit, optional=True, unit="instructions")
        if reference not in REFERENCES:
            raise HarnessError(f"{name}: reference={reference!r} is not offered; available: {', '.join(REFERENCES)}")
        whole_number(name, "max_new_tokens", max_new_tokens, unit="tokens")
        if isinstance(draw_margin, bool) or not isinstance(draw_margin, (int, float)) or not 0 <= draw_margin < 0.5:
            raise HarnessError(f"{name}: draw_margin={draw_margin!r} must be a number in [0, 0.5)")
        self.name, self.version, self.limit, self.reference = name, str(version), limit, reference
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample),
                           "temperature": float(temperature), "seed": int(seed)}
        self.draw_margin = float(draw_margin)
        self.judge_config = dict(judge or {"type": "local_hf"})
        self.mirror_file, self.hub_id, self.hub_config, self.hub_split = mirror_file, hub_id, hub_config, hub_split
        self._judge = build_judge(self.judge_config, config_key=f"task_params.{name}.judge")  # checks the config now
        self._judge_key = ("cpu", 8)

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
            return TaskResult(metrics=self._metrics(samples, judged=False), samples=samples, details=details)
        else:
            references = self._generations(checkpoint.reference_path, checkpoint.use_chat_template, instructions,
                                           context, "reference outputs")
            details["reference_checkpoint"] = str(checkpoint.reference_path)

        referenced = time.perf_counter()
        judge = self._judge_for(context)
        to_judge = [k for k in range(len(rows)) if outputs[k] != references[k]]
        judged = judge.judge_batch([(instructions[k], outputs[k], references[k]) for k in to_judge]) if to_judge else []
        judgments = dict(zip(to_judge, judged))
        samples = [self._sample(k, instructions[k], outputs[k], references[k], judgments.get(k)) for k in range(len(rows))]
        details["identical_outputs"] = len(rows) - len(to_judge)
        details["seconds"] = {"generation": round(generated - started, 1),
                              "reference_generation": round(referenced - generated, 1),
                              "judging": round(time.perf_counter() - referenced, 1)}
        return TaskResult(metrics=self._metrics(samples, judged=True), samples=samples, details=details)

    # ------------------------------------------------------------------------------------------
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

    def _metrics(self, samples: list[dict], *, judged: bool) -> dict[str, Metric]:
        outcome = win_rate_from_preferences([s["preference"] for s in samples])
        scores = [s["scores"]["win_rate"] for s in samples]
        lengths = [s["output_chars"] for s in samples], [s["reference_chars"] for s in samples]
        controlled = length_controlled_scores(scores, *lengths) if judged else scores
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
                           "instructions": instructions, "generation": self.generation, "prompt_format": "format_prompt/1"})
        cache_file = Path(context.cache_dir) / "win_rate_generations" / f"{key}.json"
        if cache_file.exists():
            return json.loads(cache_file.read_text(encoding="utf-8"))["outputs"]
        from harness.evaluate.generation import format_prompt, generate, load_for_generation

        model, tokenizer = load_for_generation(path, context.device)
        prompts = [format_prompt(tokenizer, [{"role": "user", "content": text}], use_chat_template) for text in instructions]
        outputs = generate(model, tokenizer, prompts, batch_size=context.batch_size, device=context.device,
                           progress=f"{self.name}: {what}" if context.show_progress else None, **self.generation)
        del model
        atomic_write_text(cache_file, json.dumps({"model": str(path), "outputs": outputs}, ensure_ascii=False))
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


def length_controlled_scores(scores: list[float], output_lengths: list[int], reference_lengths: list[int],
                             *, c: float = LENGTH_CONTROL_C) -> list[float]:
    """Per-item length-controlled win scores (see the module docstring); their mean is the controlled win rate.

    Fits P(win) = σ(a + b·tanh(Δ / sd(Δ))) to the soft targets y by Newton's method, with an L2 penalty
    b² / (2c) on the slope only. When Δ does not vary (or every y is equal) there is nothing to control
    for and the scores are returned unchanged.
    """
    n = len(scores)
    y = [float(s) for s in scores]
    delta = [o - r for o, r in zip(output_lengths, reference_lengths)]
    mean_delta = sum(delta) / n
    sd = math.sqrt(sum((d - mean_delta) ** 2 for d in delta) / (n - 1)) if n > 1 else 0.0
    if sd == 0.0 or len(set(y)) == 1:
        return y
    x = [math.tanh(d / sd) for d in delta]
    penalty = 1.0 / c

    def loss(a: float, b: float) -> float:  # soft-label log loss + slope penalty
        return sum(_softplus(a + b * xi) - t * (a + b * xi) for xi, t in zip(x, y)) + penalty * b * b / 2

    a, b = 0.0, 0.0
    for _ in range(100):  # Newton's method with step halving
        fitted = [_sigmoid(a + b * xi) for xi in x]
        residual = [f - t for f, t in zip(fitted, y)]
        weight = [f * (1 - f) for f in fitted]
        g_a, g_b = sum(residual), sum(r * xi for r, xi in zip(residual, x)) + penalty * b
        h_aa, h_ab = sum(weight), sum(w * xi for w, xi in zip(weight, x))
        h_bb = sum(w * xi * xi for w, xi in zip(weight, x)) + penalty
        determinant = h_aa * h_bb - h_ab * h_ab
        if determinant <= 0 or abs(g_a) + abs(g_b) < 1e-12:
            break
        step_a, step_b = (h_bb * g_a - h_ab * g_b) / determinant, (h_aa * g_b - h_ab * g_a) / determinant
        current, scale = loss(a, b), 1.0
        while scale > 1e-6 and loss(a - scale * step_a, b - scale * step_b) > current:
            scale /= 2
        a, b = a - scale * step_a, b - scale * step_b
    controlled = _sigmoid(a)
    return [t - _sigmoid(a + b * xi) + controlled for t, xi in zip(y, x)]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


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
