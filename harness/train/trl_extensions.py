"""What TRL 1.16's ``DPOTrainer`` lacks, added through the smallest overrides: a pluggable pairwise
loss, a reference log-prob cache shared by every run on disk, and speed on the CPU (a compact LM head, whole-logit
scoring, length-sorted micro-batches).

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
* the precision the reference runs in (parameter dtype, ``bf16``/``fp16`` autocast flags) and its attention kernel
  (``eager``/``sdpa``: under bf16 they round differently);
* everything that shapes the scored tokens: the tokenized ``prompt_ids``/``chosen_ids``/
  ``rejected_ids`` of every row in order, ``max_length``, ``truncation_mode``;
* a format version (``CACHE_FORMAT``).

Not in the key: batch size and device. They change the numbers only at float-rounding level
(padding is masked), which the harness treats as the same reference. An entry is one
``<key>.safetensors`` file (float32 ``ref_chosen_logps`` and ``ref_rejected_logps``, one value per
row; the key's inputs in the metadata) under a checksum header (``harness.inputs.cache.write_checked``),
written to a temporary name and renamed, so a reader sees a whole entry or none, and a damaged one is
scored again. Concurrent writers of one key write identical files.

**Compact LM head** (``HarnessDPOTrainer.compact_lm_head``, on). TRL's fused LM head projects only the positions
whose label is scored (the completion tokens) on Triton devices, but every position — prompt and padding too —
elsewhere, to keep tile shapes fixed for compilers (Neuron); on the CPU that is a vocabulary-wide projection,
forward and backward, of tokens nobody scores (one core, bf16, 8 sequences of 200 tokens of which 130 prompt: a
forward and backward takes 14.1 CPU seconds, 10.0 compact). The trainer's forwards (policy and reference) run inside
``compact_scoring()``, which takes TRL's compact path on every device. The log-probs are the same numbers (each
position's row of the projection is computed alone); only unscored work goes.

**Whole-logit scoring on the CPU** (``HarnessDPOTrainer.whole_logit_scoring``, on). On a device without Triton, TRL's
kernel (``trl.kernels.ChunkedLogProbFunction``) folds each [tokens × 32,768] logit tile in torch ops — some 25
elementwise passes over every tile, forward and backward, by its code — and runs its gradient matmuls in fp32 (``.float()`` of bf16 tiles).
``WholeLogitScoring`` is the same call computed as one autocast matmul and a log-softmax over the whole fp32 logits
through autograd: the projection and its gradients in bf16 like every other linear layer under autocast, half the
passes (one core, bf16, 560 scored tokens × 49,152: forward and backward 2.48 → 1.25 CPU seconds). It keeps the
fp32 logits for the backward pass, so above ``WHOLE_LOGITS_MAX_ELEMENTS`` scored tokens × vocabulary, and on Triton
devices, TRL's kernel runs. Its extra outputs (entropy, mean logit, top-1) carry no gradient: the DPO trainer only
logs them.

**Length-sorted micro-batches** (``HarnessDPOTrainer.sort_micro_batches``, on). Each optimizer step takes the same
pairs as TRL's random order gives it (accelerate's ``SeedableRandomSampler``, same seed), but sorted by length before
they are cut into micro-batches, so each micro-batch pads to lengths close to its own (smoke budget: 31 % → 22 % of
the forward passes' positions are padding, over 400 pairs). The step's gradient is the same average over the same
pairs: each micro-batch is the same size and TRL's loss is a per-pair mean. Only for per-pair losses
(``PER_PAIR_LOSSES``); a loss over micro-batch statistics (``aot``, ``bco_pair``'s running mean, ``sft``'s token mean,
an own ``pairwise_loss`` such as β-DPO's) keeps the random micro-batches. transformers' own ``group_by_length``
changes which pairs share a step and ``batch_rebalance`` varies the micro-batch size (which reweights pairs under
a per-micro-batch mean), hence this sampler.

**Compact LM head for CPO and SimPO** (``cpo_trainer_class()``, TRL's experimental ``CPOTrainer`` with
``concatenated_forward`` overridden; ``compact_lm_head`` on). TRL's CPO forward asks the model for every position's
logits — prompt, completion and padding, the whole vocabulary — and then masks all but the completion's labels.
The override asks only for the positions from the batch's earliest scored one on (``logits_to_keep``, which
transformers' causal LMs take): on a mini-study batch (48 prompt + 16 completion tokens) a quarter of them, and on
Gemma 3 the 262k-wide head is most of a step's work (py-spy, one core: 98 s of a 106 s CPO run in the trainer's
epoch, 70 s of it backward). The loss terms are the same numbers: the log-probs sum or average the same scored
positions, the NLL term is the same mean over the chosen completions' tokens. One logged metric reads differently:
``logits/chosen`` and ``logits/rejected`` average the kept positions only. Encoder-decoder models, router
auxiliary losses and a model whose forward takes no ``logits_to_keep`` run TRL's own forward.

The trainer records ``reference_cache_status[name]`` (``hit`` / ``miss`` / ``off``) and
``reference_seconds`` (time spent obtaining reference log-probs: loading on a hit, scoring on a
miss) for the method adapter's accounting: a hit costs no reference tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from trl import DPOTrainer, KTOTrainer, SFTTrainer

from harness.inputs.cache import count_build, entry_lock, read_checked, write_checked

CACHE_FORMAT = 1
CACHE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# TRL loss types whose loss is a mean of per-pair terms (trl DPOTrainer._compute_loss): the micro-batch split of a
# step does not change the step's gradient, so its pairs may be sorted by length first
PER_PAIR_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard",
                             "apo_zero", "apo_down", "discopop"})


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


@contextlib.contextmanager
def compact_scoring():
    """Inside this block, TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) projects only the scored
    positions on every device, as it does on Triton devices (see the module docstring). TRL decides by calling
    ``trl.trainer.utils._use_triton`` once per forward; the block answers "compact" there and nowhere else (the
    kernel's own choice of Triton or torch tiles is untouched). A TRL without that hook runs its own path."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = decide


# Largest scored tokens × vocabulary that ``WholeLogitScoring`` scores with whole logits: it keeps them in fp32 for
# the backward pass (4 bytes each: 512 MiB here; a smoke micro-batch, ≤ 512 completion tokens, needs ≤ 96 MiB)
WHOLE_LOGITS_MAX_ELEMENTS = 2**27


class WholeLogitScoring:
    """``trl.kernels.ChunkedLogProbFunction.apply`` (same arguments, same five outputs) with whole logits on devices
    without Triton (module docstring); TRL's kernel itself on Triton devices and above ``WHOLE_LOGITS_MAX_ELEMENTS``.
    The harness's own code because TRL has only the tiled kernel, written for GPUs."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs",)):
        from trl.kernels import ChunkedLogProbFunction
        from trl.kernels.chunked_logprob import _use_triton

        if _use_triton(hidden.device) or hidden.shape[0] * weight.shape[0] > WHOLE_LOGITS_MAX_ELEMENTS:
            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                final_logit_softcapping, logit_scale, outputs)
        z = torch.nn.functional.linear(hidden, weight, bias).float()  # autocast: a bf16 matmul, then fp32
        if logit_scale != 1.0:
            z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        if temperature != 1.0:
            z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        logprobs = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
        entropy = log_sum_sq_probs = mean_logits = is_top1 = None
        with torch.no_grad():
            if "entropy" in outputs or "log_sum_sq_probs" in outputs:
                probs = torch.softmax(z, dim=-1)
                if "entropy" in outputs:
                    entropy = log_z - (probs * z).sum(-1)
                if "log_sum_sq_probs" in outputs:
                    log_sum_sq_probs = torch.log(probs.square().sum(-1))
            if "mean_logits" in outputs:
                mean_logits = z.mean(-1)
            if "is_top1" in outputs:
                is_top1 = z.argmax(-1) == targets  # the first maximum, as TRL's kernel counts a tie
        return logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1


@contextlib.contextmanager
def whole_logit_scoring():
    """Inside this block, TRL's fused LM head scores through ``WholeLogitScoring`` instead of TRL's kernel (it calls
    ``trl.trainer.utils._ChunkedLogProbFunction.apply``). A TRL without that name runs its own kernel."""
    import trl.trainer.utils as trl_utils

    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if kernel is None:
        yield
        return
    trl_utils._ChunkedLogProbFunction = WholeLogitScoring
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = kernel


class StepSortedSampler(torch.utils.data.Sampler):
    """``order``'s indices with each window of ``window`` consecutive ones (one optimizer step's rows) sorted by
    ``lengths``, longest first (a step's memory peak comes in its first micro-batch). ``set_epoch`` goes to ``order``
    (accelerate reseeds its sampler each epoch through it)."""

    def __init__(self, order, lengths: list[int], window: int):
        self.order, self.lengths, self.window = order, lengths, window

    def __iter__(self):
        indices = list(self.order)
        for start in range(0, len(indices), self.window):
            yield from sorted(indices[start:start + self.window], key=lambda i: -self.lengths[i])

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)


class FastScoring:
    """The compact LM head and whole-logit scoring (module docstring) for a TRL trainer whose forwards go through
    TRL's fused LM head (``model(..., fused_lm_head=True)``): DPO's, KTO's and SFT's. ``_scoring()`` is the block to run
    them in."""

    compact_lm_head = True  # score only completion positions on every device (module docstring); bench/ turns it off
    whole_logit_scoring = True  # score with whole logits on devices without Triton (module docstring); bench/: off

    def _scoring(self):
        stack = contextlib.ExitStack()
        if self.compact_lm_head:
            stack.enter_context(compact_scoring())
        if self.whole_logit_scoring:
            stack.enter_context(whole_logit_scoring())
        return stack


class HarnessKTOTrainer(FastScoring, KTOTrainer):
    """TRL's ``KTOTrainer`` with the compact LM head and whole-logit scoring: its policy, KL-estimate and reference
    forwards (all inside ``_compute_loss``) score the same numbers with less work on the CPU. The loss is TRL's."""

    def _compute_loss(self, model, inputs, return_outputs):
        with self._scoring():
            return super()._compute_loss(model, inputs, return_outputs)


class HarnessSFTTrainer(FastScoring, SFTTrainer):
    """TRL's ``SFTTrainer`` with the compact LM head and whole-logit scoring: its forward (``fused_lm_head=True``)
    projects only the completion's labelled positions (``completion_only_loss``) on the CPU too. The loss and its
    metrics (entropy, token accuracy over the labelled positions) are TRL's."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._scoring():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


class HarnessDPOTrainer(FastScoring, DPOTrainer):
    """TRL's ``DPOTrainer`` plus an optional ``pairwise_loss``, the shared reference cache and the compact LM head.

    With ``pairwise_loss=None`` the loss is TRL's own (``args.loss_type``), so plain DPO and its
    TRL aliases use this class for the cache and the compact head alone.
    """

    sort_micro_batches = True  # sort each step's pairs by length before the micro-batch cut (module docstring)

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
                "fp16": bool(self.args.fp16), "attention": reference.config._attn_implementation,
                "max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode}

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        started = time.perf_counter()
        dataset = self._shared_handoff(dataset)
        identity = reference_identity(self.reference_path) if self.reference_path and self.reference_cache_dir else None
        if identity is None:
            self.reference_cache_status[name] = "off"
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_seconds += time.perf_counter() - started
            return dataset
        key = reference_cache_key(identity, dataset, self._reference_settings())
        entry = Path(self.reference_cache_dir) / f"{key}.safetensors"
        # one process of a fanned-out sweep scores the shared reference, the others wait and read it
        # (harness.inputs.cache.build_once); not across the ranks of one run, which score together
        with entry_lock(entry) if self.accelerator.num_processes == 1 else contextlib.nullcontext():
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
                    count_build(entry, "reference log-probs", time.perf_counter() - started)
        self.reference_seconds += time.perf_counter() - started
        return dataset

    def _shared_handoff(self, dataset: Dataset) -> Dataset:
        """With many processes (``harness.run.launch``), TRL's precompute has rank 0 write the reference columns to
        ``dataset._get_cache_file_path(...)`` and every rank read them back; an in-memory dataset names a file in each
        process's own temporary folder, so the other ranks find nothing. The file goes to the trainer's output folder
        instead, one path for every rank (TRL 1.16, ``DPOTrainer._precompute_ref_logps``)."""
        if self.accelerator.num_processes > 1 and not dataset.cache_files:
            folder = Path(self.args.output_dir) / "reference_logps"
            folder.mkdir(parents=True, exist_ok=True)
            dataset._get_cache_file_path = lambda fingerprint: str(folder / f"cache-{fingerprint}.arrow")
        return dataset

    # length-sorted micro-batches -------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not (self.sort_micro_batches and self.pairwise_loss is None and set(self.loss_types) <= PER_PAIR_LOSSES
                and type(sampler) is torch.utils.data.RandomSampler and self.args.accelerator_config.use_seedable_sampler):
            return sampler
        from accelerate.data_loader import SeedableRandomSampler

        # the order accelerate would have made of TRL's RandomSampler (accelerate.data_loader.prepare_data_loader)
        order = SeedableRandomSampler(data_source=dataset, data_seed=self.args.data_seed)
        cap = self.args.max_length or float("inf")
        lengths = [min(len(prompt) + max(len(chosen), len(rejected)), cap) for prompt, chosen, rejected
                   in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
        window = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return StepSortedSampler(order, lengths, window)

    # compact LM head, whole-logit scoring (FastScoring) ------------------------------
    def compute_ref_log_probs(self, model, inputs):
        with self._scoring():
            return super().compute_ref_log_probs(model, inputs)

    # pairwise loss ---------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        with self._scoring():
            return self._pair_loss(model, inputs, return_outputs)

    def _pair_loss(self, model, inputs, return_outputs):
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


def takes_logits_to_keep(model) -> bool:
    """Whether ``model`` (possibly wrapped by accelerate or peft) is a transformers causal LM taking
    ``logits_to_keep``."""
    import inspect

    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def kept_positions(labels: torch.Tensor) -> int:
    """How many trailing positions' logits score every label of ``labels`` (``-100`` = not scored): position p's
    logits predict label p + 1, so from the batch's earliest p whose next label is scored to the end. 0: none."""
    scored = (labels[:, 1:] != -100).any(dim=0)
    if not bool(scored.any()):
        return 0
    return labels.shape[1] - int(scored.nonzero()[0, 0])


@functools.cache
def cpo_trainer_class():
    """TRL's experimental ``CPOTrainer`` with the compact LM head (module docstring), built on first use (TRL's
    experimental package is imported only by the methods that need it)."""
    from trl.experimental.cpo import CPOTrainer

    class HarnessCPOTrainer(CPOTrainer):
        compact_lm_head = True  # tests turn it off to compare with TRL's own forward

        def concatenated_forward(self, model, batch):
            if self.is_encoder_decoder or self.aux_loss_enabled or not self.compact_lm_head \
                    or not takes_logits_to_keep(model):
                return super().concatenated_forward(model, batch)
            concatenated = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.pad_token_id,
                                                    device=self.accelerator.device)
            labels = concatenated["concatenated_labels"]
            keep = kept_positions(labels)
            if keep == 0:  # nothing scored in the batch: TRL's forward (and its NaN mean) as it is
                return super().concatenated_forward(model, batch)
            len_chosen = batch["chosen_labels"].shape[0]
            outputs = model(concatenated["concatenated_input_ids"],
                            attention_mask=concatenated["concatenated_attention_mask"], use_cache=False,
                            logits_to_keep=keep)
            logits = outputs.logits  # the last `keep` positions: labels[:, -keep:] line up with them
            labels = labels[:, -keep:]
            if self.cpo_alpha == 0:
                nll_loss = torch.tensor(0.0).to(self.accelerator.device)
            else:  # TRL's cross_entropy_loss: shifted, mean over the chosen completions' scored tokens
                nll_loss = torch.nn.functional.cross_entropy(
                    logits[:len_chosen, :-1, :].reshape(-1, logits.shape[-1]),
                    labels[:len_chosen, 1:].reshape(-1).to(logits.device))
            logps = self.get_batch_logps(logits, labels, average_log_prob=self.loss_type in ["ipo", "simpo"],
                                         is_encoder_decoder=False)
            return (logps[:len_chosen], logps[len_chosen:], logits[:len_chosen], logits[len_chosen:], nll_loss)

    return HarnessCPOTrainer
