"""Pair training with a loss over per-position distributions (TDPO's token-level KL, CRINGE's token contrast): the
pair trainer (``HarnessDPOTrainer``) with its policy — and, when the loss asks, its reference — scored as logits at
the completion positions instead of summed log-probs.

A ``token_loss`` is any callable ``token_loss(batch: TokenBatch) -> per-pair loss, shape (pairs,)`` with an attribute
``reference_logits`` (bool): whether it reads the reference's distributions. The trainer averages the per-pair losses
over the micro-batch, as TRL does. A loss object's ``metrics`` dict is logged next to TRL's metrics.

Cost, and the cheapest correct way to get the reference's distributions:

* Logits are projected only at the window of positions that predict some completion token of the micro-batch
  (``logits_to_keep``, the model's own forward and its own logit scaling / soft-capping), then packed to the completion
  tokens: a [tokens × vocabulary] fp32 tensor for the policy, with its gradient (smoke budget, SmolLM2: 8 sequences
  × ≤ 64 tokens × 49,152 × 4 bytes ≤ 100 MB), plus the log-softmax's and the backward's tensors of the same size.
* A loss that reads the reference's distributions (TDPO) cannot use the precomputed, cached sequence log-probs of the
  other DPO-family methods: one completion's distributions are its tokens × vocabulary floats (SmolLM2, 64 tokens:
  12.6 MB; 100 GB for the two completions of 4,000 pairs), so storing them costs more than recomputing. The reference runs
  forward (no gradient) on every micro-batch instead: TRL's ``precompute_ref_log_probs=False`` path, which keeps a
  second copy of the model in memory (N parameters; none with LoRA, where the reference is the adapter switched
  off). FLOPs: 2·N per token on every visit — the forward-only token per trained token that ``budget.match`` prices
  every reference-based pair method at (``forward_only_ratio`` 1), so the pricing is unchanged; only the per-visit
  payment is real here (DPO scores each distinct row once). Top-k truncated reference distributions would be
  storable, but change the KL, so they are not used.
* A loss without the reference (CRINGE) neither scores nor caches reference log-probs: the trainer fills the
  reference columns with zeros and loads no reference model.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from datasets import Dataset, concatenate_datasets

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.token_batch import TokenBatch, scored_window, token_logps
from harness.train.trl_extensions import HarnessDPOTrainer
from harness.train.trl_support import (count_tokens, epochs_fraction, finish, model_init_kwargs, peft_config,
                                       to_conversational, trl_arguments)


class TokenLevelDPOTrainer(HarnessDPOTrainer):
    """``HarnessDPOTrainer`` whose loss is a ``token_loss`` on packed completion-token logits (module docstring)."""

    def __init__(self, *args, token_loss, **kwargs):
        self.token_loss = token_loss
        # the pairwise_loss slot refuses TRL options that change scoring and keeps the random micro-batch order
        super().__init__(*args, pairwise_loss=token_loss, **kwargs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if getattr(self.token_loss, "reference_based", True):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # a reference-free loss: zero columns stand in for the reference, nothing is scored or cached
        self.reference_cache_status[name] = "unused"
        zeros = {column: [0.0] * len(dataset) for column in ("ref_chosen_logps", "ref_rejected_logps")}
        return concatenate_datasets([dataset, Dataset.from_dict(zeros)], axis=1)

    def _logits(self, model, model_kwargs: dict, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = model(**model_kwargs, logits_to_keep=positions).logits
        return logits[mask].float()

    def _reference_logits(self, model_kwargs: dict, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        adapter = contextlib.nullcontext()
        model = self.ref_model
        if model is None and is_peft_model(self.model):  # LoRA: the reference is the model with its adapter off
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            model = self.model
        if model is None:
            raise ValueError("a token loss reading reference logits needs precompute_ref_log_probs=False")
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            return self._logits(model, model_kwargs, positions, mask)

    def _pair_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        positions, mask = scored_window(completion_mask)
        rows = torch.arange(completion_mask.size(0), device=completion_mask.device).unsqueeze(1).expand_as(mask)
        labels = inputs["input_ids"][:, 1:][:, positions][mask]  # position p's logits predict token p + 1
        batch = TokenBatch(logits=self._logits(model, model_kwargs, positions, mask), labels=labels,
                           sequence=rows[mask], pairs=completion_mask.size(0) // 2)
        if getattr(self.token_loss, "reference_logits", False):
            batch.reference_logits = self._reference_logits(model_kwargs, positions, mask)
        losses = self.token_loss(batch)
        loss = losses.mean()
        with torch.no_grad():
            chosen_logps, rejected_logps = batch.sequence_sums(token_logps(batch.logits, batch.labels)).chunk(2)
            if batch.reference_logits is not None:
                ref_chosen, ref_rejected = batch.sequence_sums(token_logps(batch.reference_logits, batch.labels)).chunk(2)
            else:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        no_token_outputs = SimpleNamespace(entropy=None, is_top1=None)
        self._log_pair_metrics(mode, no_token_outputs, completion_mask[:, 1:], chosen_logps, rejected_logps,
                               ref_chosen, ref_rejected)
        return (loss, None) if return_outputs else loss


def token_level_trainer(job: TrainingJob, *, beta: float, learning_rate: float, token_loss):
    """A ``TokenLevelDPOTrainer`` on the pairs of ``job.plan`` from its starting checkpoint (also the reference)."""
    from harness.inputs.tokenizer_cache import load_tokenizer
    from trl import DPOConfig

    reference_logits = bool(getattr(token_loss, "reference_logits", False))
    config = DPOConfig(**trl_arguments(job, learning_rate=learning_rate), beta=beta,
                       precompute_ref_log_probs=not reference_logits, model_init_kwargs=model_init_kwargs(job))
    start = job.start_checkpoint
    return TokenLevelDPOTrainer(
        model=str(start),
        args=config,
        train_dataset=Dataset.from_list(to_conversational(job.plan.rows)),
        processing_class=load_tokenizer(start),
        peft_config=peft_config(job),
        token_loss=token_loss,
    )


def train_token_level(job: TrainingJob, *, beta: float, learning_rate: float, token_loss) -> TrainingOutcome:
    """Train on ``job``'s pairs with ``token_loss`` and save the policy. Reference tokens: every visit's, when the loss
    reads the reference's logits (scored on each micro-batch, never cached); none otherwise."""
    trainer = token_level_trainer(job, beta=beta, learning_rate=learning_rate, token_loss=token_loss)
    trainer.train()
    passes = epochs_fraction(trainer, job)
    rows = len(job.plan.rows)
    tokens = count_tokens(trainer.train_dataset, ["chosen_ids", "rejected_ids"], trainer.args.max_length)
    reference_tokens = round(passes * tokens) if getattr(token_loss, "reference_logits", False) else 0
    return finish(trainer, job, examples=round(passes * rows), pairs=passes * rows,
                  policy_tokens=round(passes * tokens), reference_tokens=reference_tokens,
                  extra={"reference_cache": "off" if reference_tokens else "unused",
                         "reference_tokens_scored_here": reference_tokens})
