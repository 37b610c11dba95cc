"""Feedback: which response of each preference pair is preferred — the data set's human labels, or an AI judge's.

``feedback=human`` (``conf/feedback/human.yaml``, the default) trains every method on the data set's own labels.
``feedback=<judge config>`` (``conf/feedback/local-judge.yaml``, ``api-judge.yaml``, ``reward-model-judge.yaml``)
runs a **label** stage before any method trains — AI feedback (RLAIF: Lee et al. 2023, arXiv:2309.00267; the
preference-labelling step of Bai et al. 2022, arXiv:2212.08073). The judge is one of the win-rate task's
(``harness.evaluate.judges``: ``local_hf``, ``openai_api``, ``reward_model``), asked in both presentation orders and
averaged, and gives for each pair p = P(the data set's chosen response is better):

* p > ½ + ``draw_margin``: the pair keeps its order (the judge agrees with the human label);
* p < ½ − ``draw_margin``: chosen and rejected swap (the judge disagrees);
* otherwise a tie. ``ties: drop`` (default) removes the pair and judges the next training pairs until the
  budget's pairs are filled, so every method still trains on ``budget.pairs`` pairs, all AI-labelled;
  ``ties: keep`` keeps a tie in the data set's order (a human label leaks in; the record counts them).

Every method then trains on the labelled pairs unchanged. Relabelled: the first ``budget.pairs`` training pairs
(what methods train on; ``stage_budget.pairs`` when more and an online method's Bradley–Terry reward model trains
on them) and, with ``tune.trials`` > 0, the tuning selection pairs (the last ``tune.heldout_pairs`` held-out pairs).
Not relabelled: the held-out pairs that the ``heldout_preference`` task and a reward model's held-out accuracy
score (evaluation stays against the human labels), and derived starting settings (the SFT stage trains on the
data set's chosen responses, so human- and AI-feedback runs of a setting start from the same checkpoint).

Judgments are cached in ``<cache>/feedback/<key>.json``, key = hash of (judge identity, the pairs' text): a rerun
reads them without loading the judge. Each judged pair, its probability and label are written to
``results/<sweep>/feedback/<key>.jsonl``; the records of trained runs carry the summary under ``feedback``
(``"human"``, or the judge, the tie rule, pairs judged / flipped / tied, agreement with the human labels and the
judge's position consistency, each ± standard error) and the run id hashes the feedback, so human- and
AI-feedback runs never share a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.cache import build_once, read_checked_json, write_checked_json
from harness.inputs.paths import atomic_write_text
from harness.identity import config_hash

log = logging.getLogger("harness")
HUMAN = "human"
TIE_RULES = ("drop", "keep")
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def conversation_text(messages) -> str:
    """The instruction a pairwise judge reads for a chat prompt: a single user turn as it is, a longer dialogue
    as ``Human: ... / Assistant: ...`` turns (the judge then compares the replies to its last turn)."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def judged_prompt_tokens(judgments) -> int:
    """Prompt tokens a local judge read for ``judgments`` (both orders; 0 for judges that do not report them)."""
    total = 0
    for judgment in judgments:
        raw = judgment.raw if hasattr(judgment, "raw") else judgment.get("raw", {})
        for order in raw.values():
            if isinstance(order, dict):
                total += int(order.get("prompt_tokens", 0))
    return total


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class Feedback:
    """The sweep's feedback source: ``judge`` None means the data set's human labels."""

    name: str = HUMAN
    judge_config: dict | None = None
    draw_margin: float = 0.0
    ties: str = "drop"
    batch_size: int = 8
    judge: object = None

    @property
    def is_human(self) -> bool:
        return self.judge_config is None

    def identity(self) -> dict | None:
        """What a trained run's id hashes about its feedback; None for human labels (run ids unchanged)."""
        if self.is_human:
            return None
        return {"judge": judge_identity(self.judge), "draw_margin": self.draw_margin, "ties": self.ties}


def feedback_from_config(cfg, *, device: str = "cpu", cache_dir: Path | None = None) -> Feedback:
    """Check the sweep's ``feedback`` config and build its judge (nothing is loaded until the first judgment)."""
    from omegaconf import OmegaConf

    from harness.evaluate.judges import build_judge

    if cfg is None or cfg == HUMAN:
        return Feedback()
    values = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    judge_config = values.get("judge")
    if not judge_config:
        return Feedback(name=values.get("name", HUMAN))
    margin = values.get("draw_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
        raise HarnessError(f"feedback.draw_margin={margin!r} must be a number in [0, 0.5)")
    ties = values.get("ties", "drop")
    if ties not in TIE_RULES:
        raise HarnessError(f"feedback.ties={ties!r} is unknown; available: {', '.join(TIE_RULES)}")
    batch_size = values.get("batch_size", 8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HarnessError(f"feedback.batch_size={batch_size!r} must be a positive number of pairs")
    judge = build_judge(judge_config, device=device, batch_size=batch_size, config_key="feedback.judge",
                        cache_dir=cache_dir)
    return Feedback(name=values.get("name", "judge"), judge_config=dict(judge_config), draw_margin=float(margin),
                    ties=ties, batch_size=batch_size, judge=judge)


def judge_identity(judge) -> dict:
    """The judge's identity, plus its weights' files when its model is a local folder (a retrained judge at the
    same path must not hit the cache)."""
    from harness.train.rewards import weight_identity

    identity = dict(judge.identity())
    spec = identity.get("model")
    if isinstance(spec, str) and (Path(spec).expanduser() / "config.json").exists():
        identity["weights"] = weight_identity(Path(spec).expanduser())
    return identity


# ---------------------------------------------------------------------------------------------------------------
# labelling


def preference_of(probability: float, draw_margin: float) -> str:
    """"1" the data set's chosen response is better, "2" its rejected one, "0" a tie."""
    from harness.evaluate.judges import preference_label

    return preference_label(probability, draw_margin)


def relabel(rows: list[dict], judgments: list[dict], *, draw_margin: float, ties: str) -> tuple[list[dict], list[dict]]:
    """The pairs as the judge labels them, and one item per pair for the record.

    ``judgments[k]["probability"]`` is P(``rows[k]["chosen"]`` is better). A pair the judge prefers the other way
    is swapped; a tie is dropped (``ties="drop"``) or kept in its order (``"keep"``).
    """
    kept, items = [], []
    for row, judgment in zip(rows, judgments):
        label = preference_of(judgment["probability"], draw_margin)
        item = {"source_row": row.get("source_row"), "probability": judgment["probability"],
                "output_1_first": judgment["output_1_first"], "output_1_second": judgment["output_1_second"],
                "label": label, "kept": label != "0" or ties == "keep", "flipped": label == "2"}
        items.append(item)
        if not item["kept"]:
            continue
        if label == "2":
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
        kept.append(row)
    return kept, items


def mean_and_stderr(values: list[float]) -> dict:
    """Mean and its standard error (sample standard deviation, ddof = 1, over √n)."""
    n = len(values)
    if n == 0:
        return {"value": None, "stderr": None}
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"value": mean, "stderr": stderr}


def agreement_with_human(items: list[dict]) -> dict:
    """Per judged pair 1 when the judge prefers the human-chosen response, 0 when the other, ½ on a tie."""
    return mean_and_stderr([{"1": 1.0, "2": 0.0, "0": 0.5}[item["label"]] for item in items])


def cached_judgments(judge, rows: list[dict], *, cache_dir: Path, batch_size: int,
                     progress: str) -> tuple[list[dict], str, bool]:
    """P(chosen better) for each pair, from ``<cache_dir>/<key>.json`` or by asking ``judge`` (with a progress bar).

    Returns (judgments, key, cache hit). Identical chosen and rejected texts are a tie without asking."""
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    key = config_hash({"judge": judge_identity(judge), "pairs": pairs})
    path = Path(cache_dir) / f"{key}.json"
    asked_here = []

    def cached() -> list[dict] | None:
        found = read_checked_json(path, "judge verdicts")  # a checked file (harness.inputs.cache)
        return None if found is None else found["judgments"]

    def build() -> list[dict]:
        asked_here.append(True)
        return _ask_judge(judge, rows, path, batch_size=batch_size, progress=progress)

    judgments = build_once(path, "judge verdicts", cached, build)  # one process asks; the others read its verdicts
    return judgments, key, not asked_here


def _ask_judge(judge, rows: list[dict], path: Path, *, batch_size: int, progress: str) -> list[dict]:
    from tqdm.auto import tqdm

    judgments: list[dict] = [{"probability": 0.5, "output_1_first": 0.5, "output_1_second": 0.5, "method": "identical",
                              "raw": {}} for _ in rows]
    asked = [k for k, r in enumerate(rows) if r["chosen"] != r["rejected"]]
    with tqdm(total=len(asked), desc=progress, unit="pair") as bar:
        for start in range(0, len(asked), batch_size):
            batch = asked[start: start + batch_size]
            answers = judge.judge_batch([(conversation_text(rows[k]["prompt"]), rows[k]["chosen"], rows[k]["rejected"])
                                         for k in batch])
            for k, answer in zip(batch, answers):
                judgments[k] = {"probability": answer.probability, "output_1_first": answer.output_1_first,
                                "output_1_second": answer.output_1_second, "method": answer.method, "raw": answer.raw}
            bar.update(len(batch))
    write_checked_json(path, {"judge": judge_identity(judge), "pairs": len(rows), "judgments": judgments})
    return judgments


@dataclass
class Labelled:
    """A labelled pair set: the pairs to train on, one item per judged pair, and the summary for records."""

    rows: list[dict]
    items: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def label_pairs(rows: list[dict], feedback: Feedback, *, needed: int | None, cache_dir: Path, purpose: str,
                refill: bool = True) -> Labelled:
    """Label pairs with ``feedback``'s judge: the first ``needed`` of ``rows`` (all when None); with ``ties="drop"``
    and ``refill``, dropped ties are replaced by judging the next rows, until ``needed`` pairs are kept."""
    if rows and ("chosen" not in rows[0] or "rejected" not in rows[0]):
        raise HarnessError(f"feedback={feedback.name} relabels preference pairs (chosen, rejected), but the data set's "
                           f"rows are not pairs; use feedback=human")
    needed = len(rows) if needed is None else needed
    began = time.perf_counter()
    kept, items, keys, hits, position = [], [], [], [], 0
    while len(kept) < needed and position < len(rows):
        chunk = rows[position: position + needed - len(kept)]
        judgments, key, hit = cached_judgments(feedback.judge, chunk, cache_dir=cache_dir, batch_size=feedback.batch_size,
                                               progress=f"labelling {purpose} pairs ({feedback.name})")
        new_rows, new_items = relabel(chunk, judgments, draw_margin=feedback.draw_margin, ties=feedback.ties)
        for item, judgment in zip(new_items, judgments):
            item["judge_prompt_tokens"] = judged_prompt_tokens([judgment])
        kept += new_rows
        items += new_items
        keys.append(key)
        hits.append(hit)
        position += len(chunk)
        if not refill:
            break
    if refill and len(kept) < needed:
        raise HarnessError(f"feedback: the judge tied on {sum(i['label'] == '0' for i in items)} of {len(items)} "
                           f"{purpose} pairs and only {len(kept)} of the {needed} needed remain; lower "
                           f"feedback.draw_margin, set feedback.ties=keep, or lower budget.pairs")
    tied = sum(item["label"] == "0" for item in items)
    summary = {
        "pairs_judged": len(items), "pairs_kept": len(kept), "flipped": sum(item["flipped"] for item in items),
        "tied": tied, "tied_kept": tied if feedback.ties == "keep" else 0,
        "agreement_with_human": agreement_with_human(items),
        "position_consistency": mean_and_stderr([
            float(preference_of(i["output_1_first"], feedback.draw_margin)
                  == preference_of(i["output_1_second"], feedback.draw_margin)) for i in items]),
        "judge_prompt_tokens": sum(item["judge_prompt_tokens"] for item in items),
        "cache": "hit" if all(hits) else "miss", "cache_keys": keys, "seconds": round(time.perf_counter() - began, 2),
    }
    return Labelled(rows=kept, items=items, summary=summary)


def record_summary(feedback: Feedback, train: Labelled, selection: Labelled | None, file: str) -> dict:
    """The ``feedback`` block of a trained run's record."""
    identity = judge_identity(feedback.judge)
    out = {"source": "judge", "name": feedback.name,
           "judge": {k: identity.get(k) for k in ("type", "model", "max_output_chars", "base_url") if k in identity},
           "judge_key": config_hash(identity), "draw_margin": feedback.draw_margin, "ties": feedback.ties,
           **train.summary, "file": file}
    if selection is not None:
        out["selection"] = selection.summary
    return out


def write_items(path: Path, rows: list[dict], items: list[dict]) -> None:
    """Per judged pair: the data set's pair, the judge's probability, label and what training gets."""
    lines = []
    for row, item in zip(rows, items):
        lines.append(json.dumps({**item, "prompt": row["prompt"], "human_chosen": row["chosen"],
                                 "human_rejected": row["rejected"]}, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
