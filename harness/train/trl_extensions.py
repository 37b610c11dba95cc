"""What TRL 1.16's ``DPOTrainer`` lacks, added through the smallest overrides: a pluggable pairwise
loss, and a reference log-prob cache shared by every run on disk.

Import this module only inside a method's ``train`` (it imports TRL at the top, and the harness
core must not pay for TRL at import time).

**Pairwise loss** (``HarnessDPOTrainer(pairwise_loss=...)``). TRL inlines its losses inside
``_compute_loss``, so a new loss means overriding that one method. The override keeps TRL's own
log-prob path — ``model(..., labels=..., fused_lm_head=True)``, the kernel TRL patches onto the
policy in ``__init__`` and also uses in ``compute_ref_log_probs`` — rather than a separate
``logits → log_softmax → gather``: reference log-probs (precomputed, or shared through the cache
with plain DPO) and policy log-probs then come from the same arithmetic, so the log-ratio of an
untrained policy is zero to float rounding, and the full ``(batch, length, vocabulary)`` logits
are never held in memory. The loss is any callable::

    pairwise_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths) -> per-pair loss, shape (batch,)

with log-probs summed over completion tokens and lengths = completion token counts (after the
collator's truncation to ``max_length``); hyperparameters are bound beforehand
(``functools.partial``). The trainer averages the per-pair losses over the micro-batch, as TRL
does, so a loss that needs batch statistics (β-DPO) sees the whole micro-batch. A loss object
with a ``metrics`` dict attribute has those values logged next to TRL's. The logged metrics are
TRL's names and definitions (``rewards/*`` = ``args.beta`` × log-ratio, ``logps/*``, ``entropy``,
``mean_token_accuracy``), so training curves read the same for every method. Not supported with
a pairwise loss: ``ld_alpha``, ``use_weighting`` and f-divergences other than reverse KL (each
changes how TRL forms log-probs or scores); the constructor refuses them.

**Reference cache** (``reference_cache_dir=``, ``reference_path=``, with
``precompute_ref_log_probs=True``). ``_precompute_ref_logps`` looks the reference log-probs up in a
content-addressed folder before scoring anything, and stores them there after a miss. The key is
the SHA-256 of

* the reference model's identity (``reference_identity``): its resolved folder path, the SHA-256
  of its ``config.json``, and the name, size and modification time (ns) of each weights file —
  cheap on a 7B model, and any rewrite of the weights changes it. A checkpoint rewritten with
  identical bytes is a miss (a wasted forward pass, never a wrong hit);
* the precision the reference runs in (parameter dtype, ``bf16``/``fp16`` autocast flags);
* everything that shapes the scored tokens: the tokenized ``prompt_ids``/``chosen_ids``/
  ``rejected_ids`` of every row in order, ``max_length``, ``truncation_mode``;
* a format version (``CACHE_FORMAT``).

Not in the key: batch size and device. They change the numbers only at float-rounding level
(padding is masked), which the harness treats as the same reference. An entry is one
``<key>.safetensors`` file (float32 ``ref_chosen_logps`` and ``ref_rejected_logps``, one value per
row; the key's inputs in the metadata) under a checksum header (``harness.inputs.cache.write_checked``),
written to a temporary name and renamed, so a reader sees a whole entry or none, and a damaged one is
scored again. Concurrent writers of one key write identical files.

The trainer records ``reference_cache_status[name]`` (``hit`` / ``miss`` / ``off``) and
``reference_seconds`` (time spent obtaining reference log-probs: loading on a hit, scoring on a
miss) for the method adapter's accounting: a hit costs no reference tokens.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets
from trl import DPOTrainer

from harness.inputs.cache import read_checked, write_checked

CACHE_FORMAT = 1
CACHE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_identity(path: str | Path) -> dict | None:
    """What identifies a local reference checkpoint (see module docstring); None if not a local folder."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return None
    folder = folder.resolve()
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {
        "path": str(folder),
        "config_sha256": _file_sha256(folder / "config.json"),
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }


def reference_cache_key(identity: dict, dataset: Dataset, settings: dict) -> str:
    """SHA-256 of the reference identity, the scoring settings and every row's token ids, in order."""
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "reference": identity, "settings": settings, "rows": len(dataset)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for column in TOKEN_COLUMNS:
        digest.update(column.encode())
        for ids in dataset[column]:
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def load_reference_logps(cache_dir: Path, key: str, rows: int) -> dict[str, np.ndarray] | None:
    """The cached columns of ``key``, or None when absent, damaged (checksum, ``harness.inputs.cache``) or not
    ``rows`` long."""
    from safetensors.numpy import load

    data = read_checked(Path(cache_dir) / f"{key}.safetensors", "reference log-probs")
    if data is None:
        return None
    values = load(data)
    if any(values.get(c) is None or len(values[c]) != rows for c in CACHE_COLUMNS):
        return None
    return {c: values[c] for c in CACHE_COLUMNS}


def store_reference_logps(cache_dir: Path, key: str, columns: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write one entry atomically (a checked file: checksum header, temporary name, then rename)."""
    from safetensors.numpy import save

    path = Path(cache_dir) / f"{key}.safetensors"
    arrays = {c: np.ascontiguousarray(columns[c], dtype=np.float32) for c in CACHE_COLUMNS}
    write_checked(path, save(arrays, metadata={k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}))
    return path


class HarnessDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` plus an optional ``pairwise_loss`` and the shared reference cache.

    With ``pairwise_loss=None`` the loss is TRL's own (``args.loss_type``), so plain DPO and its
    TRL aliases use this class for the cache alone.
    """

    def __init__(self, *args, pairwise_loss=None, reference_cache_dir: str | Path | None = None,
                 reference_path: str | Path | None = None, **kwargs):
        # set before DPOTrainer.__init__, which runs _precompute_ref_logps
        self.pairwise_loss = pairwise_loss
        self.reference_cache_dir = Path(reference_cache_dir) if reference_cache_dir else None
        self.reference_path = reference_path
        self.reference_cache_status: dict[str, str] = {}
        self.reference_seconds = 0.0
        config = kwargs.get("args")
        if pairwise_loss is not None and config is not None:
            if config.ld_alpha is not None or config.use_weighting or config.f_divergence_type != "reverse_kl":
                raise ValueError("a pairwise_loss replaces TRL's scoring: leave ld_alpha, use_weighting and "
                                 "f_divergence_type at their defaults")
        super().__init__(*args, **kwargs)

    # reference cache -------------------------------------------------------------------
    def _reference_settings(self) -> dict:
        reference = self.ref_model or self.model
        return {"dtype": str(next(reference.parameters()).dtype), "bf16": bool(self.args.bf16),
                "fp16": bool(self.args.fp16), "max_length": self.args.max_length,
                "truncation_mode": self.args.truncation_mode}

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        started = time.perf_counter()
        identity = reference_identity(self.reference_path) if self.reference_path and self.reference_cache_dir else None
        if identity is None:
            self.reference_cache_status[name] = "off"
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_seconds += time.perf_counter() - started
            return dataset
        key = reference_cache_key(identity, dataset, self._reference_settings())
        cached = load_reference_logps(self.reference_cache_dir, key, len(dataset))
        if cached is not None:
            self.reference_cache_status[name] = "hit"
            dataset = concatenate_datasets([dataset, Dataset.from_dict(cached)], axis=1)
        else:
            self.reference_cache_status[name] = "miss"
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                columns = {c: np.asarray(dataset[c], dtype=np.float32) for c in CACHE_COLUMNS}
                store_reference_logps(self.reference_cache_dir, key, columns,
                                      {"reference": identity, "settings": self._reference_settings(),
                                       "rows": len(dataset)})
        self.reference_seconds += time.perf_counter() - started
        return dataset

    # pairwise loss ---------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        if self.pairwise_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:]
        seq_len = shift_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]  # prompt-learning PEFT prepends virtual tokens
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # batch is [chosen; rejected]
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)

        losses = self.pairwise_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                    chosen_lengths, rejected_lengths)
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_pair_metrics(mode, outputs, shift_mask, chosen_logps, rejected_logps,
                               ref_chosen_logps, ref_rejected_logps)
        return (loss, outputs) if return_outputs else loss

    def _log_pair_metrics(self, mode, outputs, shift_mask, chosen_logps, rejected_logps,
                          ref_chosen_logps, ref_rejected_logps) -> None:
        """The metrics TRL's ``_compute_loss`` logs, under the same names, plus the loss's own."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        seq_len = shift_mask.size(1)
        tokens = gather(shift_mask.sum()).sum()
        if outputs.entropy is not None:
            entropy = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
            metrics["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)
        if outputs.is_top1 is not None:
            chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            chosen_mask, _ = shift_mask.chunk(2, dim=0)
            correct = gather((chosen_top1 & chosen_mask.bool()).sum()).sum()
            total = gather(chosen_mask.sum()).sum()
            metrics["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())
        for name, value in (getattr(self.pairwise_loss, "metrics", None) or {}).items():
            metrics[name].append(float(value))
