"""The list trainer the listwise methods share (``lipo``, ``rrhf``, ``pro``, each a ``ListMethod``: its loss and its
config): transformers' ``Trainer`` on the ``lists`` view (``harness.inputs.data``: a prompt and K responses, best
first, with scores), and the sampled list source (K samples from the starting checkpoint scored by the sweep's
reward, as ``methods/rso.py`` samples).

TRL has no listwise trainer, so this is the smallest one over transformers' ``Trainer``: a micro-batch of B lists
is K·B sequences (prompt + response, rendered like the pair trainers render them: ``harness.evaluate.logprobs.render``)
in one forward pass; each response's summed log-prob and token count, shaped (B, K), go to the method's loss::

    list_loss(logps, lengths, reference_logps, scores) -> per-list loss, shape (B,)

(``reference_logps`` None for a reference-free method; ``scores`` higher-is-better, responses sorted best first).
The trainer averages it over the micro-batch. A reference-based method's reference log-probs are scored once
before training with the starting model (the policy before its first step, so an untrained policy's log-ratio is
zero), forward-only, through the shared reference cache (``job.reference_cache_dir``, ``cached_reference_scores``):
the pair trainers' folder, entry format, identity of the reference and locking (``harness.train.trl_extensions``),
keyed by the lists' token ids instead of the pairs', so a later run from the same start on the same lists (another
β, learning rate, tuning trial or seed of the same sampled lists) reads them instead of scoring again. A list
entry is never a pair entry: the pair trainers score with TRL's tokenization and fused LM head, this trainer with
``render`` and ``response_logps``, whose numbers differ in the last bits — a reference from the other path would
make an untrained policy's log-ratio non-zero.

Batches (``harness.train.plan.list_batches``): a list of K counts as K − 1 pairs, so a step of
``budget.batch_pairs`` pairs takes batch_pairs // (K − 1) lists.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.data import lists_for_pairs, pair_count, pairs_per_list
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import epochs_fraction, finish, model_init_kwargs, peft_config, trl_arguments

LIST_SOURCES = ("data", "sampled")  # data = the data's lists (a pair data set: lists of 2); sampled = K samples scored


def tokenized_lists(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Each list row → ``{prompt_ids, completion_ids: K id lists, scores}``; a sequence longer than ``max_length``
    loses the end of its response (the pair trainers' ``keep_start``)."""
    from harness.evaluate.logprobs import render

    out = []
    for row in rows:
        completions, prompt_ids = [], None
        for text in row["responses"]:
            prompt_ids, completion_ids = render(tokenizer, row["prompt"], text)
            completions.append(completion_ids[: max(max_length - len(prompt_ids), 1)])
        out.append({"prompt_ids": prompt_ids[-max_length + 1:], "completion_ids": completions,
                    "scores": [float(s) for s in row["scores"]]})
    return out


def list_tokens(items: list[dict], max_length: int) -> int:
    """Tokens of every sequence (prompt + response) of tokenized lists, each capped at ``max_length``."""
    return sum(min(len(item["prompt_ids"]) + len(c), max_length) for item in items for c in item["completion_ids"])


def collate_lists(items: list[dict], pad_id: int) -> dict:
    """B lists of K → padded (B·K, T) ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on response tokens),
    and (B, K) ``scores`` (and ``reference_logps`` when the items carry them)."""
    import torch

    sequences = [(item["prompt_ids"], c) for item in items for c in item["completion_ids"]]
    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        full = list(prompt) + list(response)
        ids[row, : len(full)] = torch.tensor(full)
        attention[row, : len(full)] = 1
        completion[row, len(prompt): len(full)] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
             "scores": torch.tensor([item["scores"] for item in items], dtype=torch.float32)}
    if "reference_logps" in items[0]:
        batch["reference_logps"] = torch.tensor([item["reference_logps"] for item in items], dtype=torch.float32)
    return batch


def response_logps(model, batch: dict):
    """(summed log-prob, token count) of every response in ``batch``, each shaped (B·K,)."""
    import torch

    # only positions from the shortest prompt on predict response tokens: project those alone (``logits_to_keep``)
    first = max(int(batch["completion_mask"].any(dim=0).to(torch.int8).argmax()), 1)
    width = batch["input_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=width - first + 1).logits[:, :-1]
    labels = batch["input_ids"][:, first:]
    mask = batch["completion_mask"][:, first:].to(torch.float32)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def make_trainer_class():
    from transformers import Trainer

    class ListwiseTrainer(Trainer):
        """transformers' Trainer with a listwise loss over (B, K) response log-probs (see the module docstring)."""

        def __init__(self, *args, list_loss, **kwargs):
            super().__init__(*args, **kwargs)
            self.list_loss = list_loss
            self.model_accepts_loss_kwargs = False  # the loss is a per-list mean: the Trainer divides by accumulation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = inputs["scores"]
            logps, lengths = response_logps(model, inputs)
            logps, lengths = logps.view(scores.shape), lengths.view(scores.shape)
            loss = self.list_loss(logps, lengths, inputs.get("reference_logps"), scores).mean()
            return (loss, None) if return_outputs else loss

    return ListwiseTrainer


def reference_scores(trainer, items: list[dict], batch_lists: int) -> list[list[float]]:
    """Each list's responses' summed log-probs under the trainer's model before training (the reference), no grad,
    under the trainer's autocast so they equal the first step's policy log-probs."""
    import torch

    model = trainer.model
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad(), trainer.autocast_smart_context_manager():
        for start in range(0, len(items), batch_lists):
            chunk = items[start: start + batch_lists]
            batch = {k: v.to(device) for k, v in collate_lists(chunk, trainer.pad_id).items()}
            logps, _ = response_logps(model, batch)
            out += logps.view(len(chunk), -1).float().cpu().tolist()
    model.train()
    return out


LIST_CACHE_FORMAT = 1   # bump when what a list entry holds, or how it is scored, changes


def list_reference_key(identity: dict, items: list[dict], settings: dict) -> str:
    """SHA-256 of the reference's identity (``trl_extensions.reference_identity``), the scoring settings and every
    list's token ids in order (its prompt, then each response): ``trl_extensions.reference_cache_key`` for lists."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    header = {"format": LIST_CACHE_FORMAT, "view": "lists", "reference": identity, "settings": settings,
              "lists": len(items)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        digest.update(len(item["completion_ids"]).to_bytes(8, "little"))
        for ids in (item["prompt_ids"], *item["completion_ids"]):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cached_reference_scores(trainer, items: list[dict], batch_lists: int, *, reference_path, cache_dir,
                            max_length: int) -> tuple[list[list[float]], str]:
    """``reference_scores`` through the shared reference cache: (each list's reference log-probs, ``hit`` / ``miss``
    / ``off``). Off without a cache folder or a local reference; an entry is one checked file
    ``<cache_dir>/lists-<key>.safetensors`` (float32 log-probs of every response in order, and each list's size),
    built once under its lock (``harness.inputs.cache.build_once``)."""
    import numpy as np
    from safetensors.numpy import load, save

    from harness.inputs.cache import build_once, read_checked, write_checked
    from harness.train.trl_extensions import reference_identity

    identity = reference_identity(reference_path) if cache_dir else None
    if identity is None:
        return reference_scores(trainer, items, batch_lists), "off"
    model = trainer.model
    settings = {"dtype": str(next(model.parameters()).dtype), "bf16": bool(trainer.args.bf16),
                "fp16": bool(trainer.args.fp16), "attention": model.config._attn_implementation,
                "max_length": max_length}
    entry = Path(cache_dir) / f"lists-{list_reference_key(identity, items, settings)}.safetensors"
    sizes = [len(item["completion_ids"]) for item in items]

    def cached():
        data = read_checked(entry, "list reference log-probs")
        if data is None:
            return None
        values = load(data)
        if list(values.get("list_sizes", [])) != sizes:
            return None
        flat, ends = values["reference_logps"].tolist(), itertools.accumulate(sizes)
        return [flat[end - size: end] for size, end in zip(sizes, ends)]

    built = []

    def build():
        built.append(entry)
        scored = reference_scores(trainer, items, batch_lists)
        arrays = {"reference_logps": np.asarray([v for row in scored for v in row], dtype=np.float32),
                  "list_sizes": np.asarray(sizes, dtype=np.int64)}
        write_checked(entry, save(arrays, metadata={"reference": json.dumps(identity, sort_keys=True),
                                                    "settings": json.dumps(settings, sort_keys=True)}))
        return scored

    scores = build_once(entry, "list reference log-probs", cached, build)
    return scores, "miss" if built else "hit"


def train_listwise(job: TrainingJob, *, list_loss, learning_rate: float, reference_based: bool) -> TrainingOutcome:
    """Train ``job``'s lists (``job.plan.rows``, view ``lists``) with ``list_loss`` from the starting checkpoint and
    save the policy; counts tokens like the pair trainers (policy: every pass; reference: each sequence once)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments
    from harness.inputs.tokenizer_cache import load_tokenizer

    plan = job.plan
    if plan.view != "lists":
        raise HarnessError(f"the list trainer needs the lists view, got {plan.view!r}")
    tokenizer = load_tokenizer(job.start_checkpoint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    items = tokenized_lists(plan.rows, tokenizer, plan.max_length)
    model = AutoModelForCausalLM.from_pretrained(job.start_checkpoint, **(model_init_kwargs(job) or {}))
    lora = peft_config(job)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    arguments = {k: v for k, v in trl_arguments(job, learning_rate=learning_rate).items() if k != "max_length"}
    trainer = make_trainer_class()(
        model=model, args=TrainingArguments(**arguments), train_dataset=Dataset.from_list(items),
        processing_class=tokenizer, data_collator=lambda batch: collate_lists(batch, pad_id), list_loss=list_loss)
    trainer.pad_id = pad_id
    tokens = list_tokens(items, plan.max_length)
    reference = {}
    if reference_based:
        started = time.perf_counter()
        references, status = cached_reference_scores(trainer, items, plan.micro_batch,
                                                     reference_path=job.start_checkpoint,
                                                     cache_dir=job.reference_cache_dir, max_length=plan.max_length)
        trainer.train_dataset = Dataset.from_list([{**item, "reference_logps": ref}
                                                   for item, ref in zip(items, references)])
        # as the pair trainers (harness.train.pairwise.pairwise_usage): reference_tokens counts every list once, hit
        # or miss, so the consumed FLOPs do not depend on the sweep's order; what this run paid is said apart
        reference = {"reference_cache": status, "reference_tokens_scored_here": 0 if status == "hit" else tokens,
                     "reference_seconds": round(time.perf_counter() - started, 3)}
    trainer.train()
    passes = epochs_fraction(trainer, job)
    pairs = pair_count(plan.rows)
    extra = {"list_size": max(len(item["completion_ids"]) for item in items), "lists": len(items),
             "lists_per_step": plan.micro_batch * plan.gradient_accumulation * plan.world_size,
             "budget_pairs_per_list": "K − 1", **reference}
    return finish(trainer, job, examples=round(passes * len(items)), pairs=passes * pairs,
                  policy_tokens=round(passes * tokens), reference_tokens=tokens if reference_based else 0, extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# the sampled variant


def sampled_list_count(job: TrainingJob, size: int) -> int:
    """Lists of ``size`` samples the job's budget buys: its rows (lists of 2 from the pair data) count as pairs, a
    list of K as K − 1 of them."""
    return lists_for_pairs(pair_count(job.plan.rows), size)


def sampled_visit_cost(size: int, reference_based: bool, prompt_tokens: int, completion_tokens: int,
                       sizes) -> tuple[float, float]:
    """(trained, forward-only) policy-equivalent tokens of one budget pair of the sampled variant: 1/(K − 1) of a
    list — K completions generated and scored by the reward (× N_reward/N), then trained (and, reference-based,
    scored by the reference)."""
    sequence = prompt_tokens + completion_tokens
    per_pair = size / pairs_per_list(size)
    trained = per_pair * sequence
    forward = per_pair * sequence * (1.0 + sizes.reward_share) + (trained if reference_based else 0.0)
    return trained, forward


def train_sampled_lists(job: TrainingJob, *, size: int, temperature: float, top_k: int | None, name: str,
                        train) -> TrainingOutcome:
    """The sampled list source: ``size`` completions per prompt from the starting checkpoint (``harness.train.rounds.
    Sampler``), scored by the sweep's reward, ranked; ``train(sub_job)`` trains them. Generation and reward tokens are
    priced like the online methods' (``methods/rso.py``): forward-only policy-parameter equivalents, on top of the
    list training's own counts."""
    from transformers import AutoConfig

    from harness.train.rewards import parameter_count, reward_record
    from harness.train.rounds import Sampler, round_seed, score_samples

    reward = job.reward
    if reward is None:
        raise HarnessError(f"{name} with list_source=sampled needs a reward to score its samples: set reward=<name> "
                           f"(conf/reward/)")
    count = sampled_list_count(job, size)
    prompts = [job.plan.rows[i % len(job.plan.rows)]["prompt"] for i in range(count)]
    sampler = Sampler(job.plan, temperature, top_k, engine=job.engine)
    before = reward.tokens_scored
    samples = sampler.samples(job.start_checkpoint, prompts, size, seed=round_seed(job.seed, 1, size))
    scores = score_samples(reward, prompts, samples)
    lists = []
    for prompt, texts, values in zip(prompts, samples, scores):
        order = sorted(range(len(texts)), key=lambda i: -values[i])
        lists.append({"prompt": prompt, "responses": [texts[i] if texts[i].strip() else "." for i in order],
                      "scores": [float(values[i]) for i in order]})
    sub_job = replace(job, plan=job.plan.for_rows(lists), scratch_dir=job.scratch_dir / "lists")
    outcome = train(sub_job)
    parameters = parameter_count(job.output_dir) or AutoConfig.from_pretrained(job.output_dir).num_parameters()
    reward_tokens = reward.tokens_scored - before
    oracle_tokens = reward_tokens * reward.parameters / parameters
    extra = {**outcome.extra, "list_source": "sampled", "prompts_sampled": len(prompts),
             "generation_tokens": sampler.tokens, "reward_tokens": reward_tokens, "reward_parameters": reward.parameters,
             "reward": reward_record(reward), "list_training_reference_tokens": outcome.reference_tokens,
             "mean_sample_reward": sum(map(sum, scores)) / max(sum(map(len, scores)), 1),
             "flops_accounting": "policy-parameter equivalents (methods/ppo.py)"}
    return replace(outcome, reference_tokens=round(outcome.reference_tokens + sampler.tokens + oracle_tokens),
                   extra=extra)


def check_list_options(name: str, list_source: str, list_size: int) -> None:
    where = f"{name} (conf/method/{name}.yaml)"
    if list_source not in LIST_SOURCES:
        raise HarnessError(f"{where}: list_source={list_source!r}; choose one of {', '.join(LIST_SOURCES)}")
    if isinstance(list_size, bool) or not isinstance(list_size, int) or list_size < 2:
        raise HarnessError(f"{where}: list_size={list_size!r} must be an integer ≥ 2 (samples per prompt)")


@dataclass(eq=False)
class ListMethod:
    """What the list adapters (``methods/lipo.py``, ``rrhf``, ``pro``) share: the list-source options, their checks,
    the harness hooks of the sampled variant, and ``train``. An adapter is a dataclass deriving from it that adds its
    loss's hyperparameters as fields, sets ``name`` (and any other default) of its own, and returns its bound
    per-list loss from ``list_loss()``; the fields are the constructor's signature, so the registry binds and checks
    every one of them (``harness.protocols.Method``). One level, no deeper: shared behaviour lives below in the plain
    functions of this module."""

    data_view = "lists"
    reference_based = False      # a reference-based adapter sets True: its reference log-probs are scored first

    name: str = "list"
    learning_rate: float = 5e-7
    list_source: str = "data"    # LIST_SOURCES: the data's lists, or list_size samples a prompt scored by the reward
    list_size: int = 4           # samples a prompt (list_source=sampled)
    temperature: float = 0.7     # sampling temperature (list_source=sampled)
    top_k: int | None = 40       # sampling top-k (list_source=sampled; null = off)

    def __post_init__(self):
        check_list_options(self.name, self.list_source, self.list_size)
        sampled = self.list_source == "sampled"
        # the sampled variant needs the sweep's reward, uses the data's prompts only and prices its generation
        # (``harness.train.matching``'s ``visit_cost``)
        self.needs_reward = sampled
        self.prompts_only = sampled
        if sampled:
            self.visit_cost = lambda prompt_tokens, completion_tokens, budget, sizes: sampled_visit_cost(
                self.list_size, self.reference_based, prompt_tokens, completion_tokens, sizes)

    def list_loss(self):
        """``list_loss(logps, lengths, reference_logps, scores) -> per-list loss (B,)`` with the hyperparameters
        bound (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define list_loss()")

    def train(self, job: TrainingJob) -> TrainingOutcome:
        """The data's lists (a pair data set: lists of 2), or ``list_size`` samples a prompt scored by the reward
        (``train_sampled_lists``), trained with ``list_loss()``."""
        def train(sub_job: TrainingJob) -> TrainingOutcome:
            return train_listwise(sub_job, list_loss=self.list_loss(), learning_rate=self.learning_rate,
                                  reference_based=self.reference_based)

        if self.list_source == "sampled":
            return train_sampled_lists(job, size=self.list_size, temperature=self.temperature, top_k=self.top_k,
                                       name=self.name, train=train)
        return train(job)
