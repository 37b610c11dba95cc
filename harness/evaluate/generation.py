"""Greedy (or sampled) generation for the tasks that score model outputs (toxicity, win rate, GSM8K, ...).

``generate`` (the harness's tasks and the self-play sampler) and ``generate_until`` (lm-eval's
``generate_until`` for an ``HFLM``) run on the continuous-batching engine
(``harness.evaluate.continuous_batching``): every row stops on its own and its slot takes the next
prompt, the prompts' common prefix is encoded once, and the torch thread count follows the machine's
load. Batch-size invariance: each row has its own positions and attention mask, so with greedy
decoding in fp32 the same checkpoint gives the same text whatever the batch or slot count (up to
float summation order; tests check it per task); results are returned in the input order.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError

from harness.evaluate.logprobs import PLAIN_ROLES


def format_prompt(tokenizer, messages: list[dict], use_chat_template: bool) -> str:
    """Chat template for instruct / SFT checkpoints; plain ``Human: / Assistant:`` text for base models."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def load_for_generation(path: Path, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM
    from harness.inputs.tokenizer_cache import load_tokenizer

    tokenizer = load_tokenizer(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             device: str = "cpu", stop: list[str] | None = None, progress: str | None = None,
             threads: int | None = None) -> list[str]:
    """Continuations of ``prompts`` (text after the prompt, cut at the first ``stop`` string), in input order.

    Runs on the continuous-batching engine (``harness.evaluate.continuous_batching``): each row stops on its own (the
    model's EOS token, a ``stop`` string, ``max_new_tokens``) and its slot takes the next prompt. ``batch_size`` is a
    lower bound on the rows decoded together: the engine uses at least ``DEFAULT_SLOTS`` (32), as far as its
    key/value buffer allows (the result does not depend on it). Sampling draws from the softmax at ``temperature``,
    restricted to the ``top_k`` likeliest tokens (None: the model's generation_config ``top_k``, else transformers'
    default 50 — what ``model.generate`` did with None; ``sampling_settings``); each prompt has its own generator seeded by (``seed``,
    its position in ``prompts``), so a prompt's sample does not depend on the other prompts or on ``batch_size``.
    ``threads``: torch threads (None: the engine's load-aware choice). ``device`` is where the model already is.
    """
    from tqdm.auto import tqdm

    from harness.evaluate import continuous_batching as engine

    requests = [engine.Request(tokenizer(prompt, add_special_tokens=False)["input_ids"], max_new_tokens, tuple(stop or ()))
                for prompt in prompts]
    sampling = sampling_settings(model, temperature=temperature, top_k=top_k, seed=seed) if do_sample else None
    with tqdm(total=len(prompts), desc=progress or "generating", disable=progress is None) as bar:
        completions = engine.run(model, tokenizer, requests, eos_token_ids=eos_token_ids(model, tokenizer),
                                 sampling=sampling, slots=max(batch_size, engine.DEFAULT_SLOTS), threads=threads,
                                 on_done=lambda index, completion: bar.update(1))
    return [cut_at_stop(tokenizer.decode(c.token_ids, skip_special_tokens=True), stop) for c in completions]


def generate_static(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                    device: str = "cpu", stop: list[str] | None = None, progress: str | None = None) -> list[str]:
    """The previous path, kept for ``engine=hf`` and the benches: prompts sorted by length, left-padded static batches
    through HF ``model.generate`` (a batch decodes until its slowest row stops), one seed per batch when sampling."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress or "generating", disable=progress is None):
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        if do_sample:
            torch.manual_seed(seed)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=temperature if do_sample else None, top_p=None,
                                       top_k=top_k if do_sample else None, pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        for row, index in enumerate(batch):
            outputs[index] = cut_at_stop(tokenizer.decode(new_tokens[row], skip_special_tokens=True), stop)
    return outputs


def sampling_settings(model, *, temperature: float | None, top_k: int | None = None, top_p: float | None = None,
                      seed: int = 0):
    """What ``model.generate(do_sample=True, ...)`` samples with: a value given here, else the model's
    generation_config, else transformers' global default (``top_k`` 50, ``top_p`` 1.0, ``temperature`` 1.0) — as
    ``generate`` resolves an unset (None) value; so ``top_k=None`` means the 50 likeliest tokens, as before."""
    from transformers import GenerationConfig

    from harness.evaluate import continuous_batching as engine

    try:
        defaults = GenerationConfig._get_default_generation_params()
    except AttributeError:  # older transformers: its documented defaults
        defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    own = getattr(model, "generation_config", None)

    def resolved(value, name):
        if value is not None:
            return value
        configured = getattr(own, name, None)
        return configured if configured is not None else defaults.get(name)

    top_k = resolved(top_k, "top_k")
    return engine.Sampling(temperature=resolved(temperature, "temperature"), top_k=top_k or None,
                           top_p=resolved(top_p, "top_p"), seed=seed)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the first occurrence of any ``stop`` string."""
    for marker in stop or []:
        if marker:
            text = text.split(marker)[0]
    return text


def eos_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a row: the model's generation_config ``eos_token_id`` (what ``model.generate`` stops
    at), else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [int(t) for t in configured] if isinstance(configured, (list, tuple)) else [int(configured)]


GENERATE_UNTIL_KWARGS = {"do_sample", "temperature", "top_k", "top_p"}  # what the engine does; others are refused


def generate_until(lm, requests, disable_tqdm: bool = False) -> list[str]:
    """lm-eval's ``HFLM.generate_until`` (lm_eval/models/huggingface.py, 0.4.13) for an ``HFLM`` ``lm``, on the
    continuous-batching engine.

    Same semantics, request by request: ``until`` (a string or list) plus the EOS token's text are the stop
    strings; at most ``max_gen_toks`` (or its aliases; default ``lm.max_gen_toks``) new tokens, the model's EOS
    token ending a row; the context left-truncated to its last ``lm.max_length - max_gen_toks`` tokens;
    ``add_special_tokens`` as ``tok_batch_encode`` decides it, but per request (lm-eval decides it for a whole batch
    from its first context); the continuation decoded with special tokens skipped, then cut at the first stop
    sequence (``postprocess_generated_text``; an integer ``think_end_token`` strips up to its last occurrence
    first, as lm-eval does). ``do_sample``/``temperature`` as lm-eval normalizes them; ``top_k``/``top_p`` in
    the request's kwargs are applied; sampled requests use per-request generators seeded by torch's initial
    seed (lm-eval's ``simple_evaluate`` sets it) and the request's position. Results go to ``lm.cache_hook``
    like lm-eval's. Differences: a stop string that is a special token only (say ``</s>`` where it is not the EOS
    token) is never seen in the decoded text in either implementation, so lm-eval's rows run to the batch's
    stopping point while ours run to ``max_gen_toks``: the text is the same up to what the batch had.
    """
    import torch
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
    from tqdm import tqdm

    from harness.evaluate import continuous_batching as engine

    if getattr(lm, "backend", "causal") != "causal":
        raise HarnessError(f"generate_until: the engine runs causal LMs only, not backend {lm.backend!r}")
    tokenizer, model = lm.tokenizer, lm.model
    eos_text = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    think_end = getattr(lm, "think_end_token", None)
    groups: dict[str, list[int]] = {}
    for position, request in enumerate(requests):
        groups.setdefault(repr(sorted(request.args[1].items(), key=lambda kv: kv[0])), []).append(position)
    results: list[str | None] = [None] * len(requests)
    with tqdm(total=len(requests), disable=disable_tqdm or getattr(lm, "rank", 0) != 0,
              desc="Running generate_until requests") as bar:
        for positions in groups.values():
            gen_kwargs = requests[positions[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            unknown = sorted(set(kwargs) - GENERATE_UNTIL_KWARGS)
            if unknown:
                raise HarnessError(f"generate_until: generation kwargs {unknown} are not supported by the engine "
                                   f"(supported: until, max_gen_toks, {', '.join(sorted(GENERATE_UNTIL_KWARGS))})")
            max_context = lm.max_length - max_gen_toks
            if max_context <= 0:
                raise HarnessError(f"generate_until: max_gen_toks={max_gen_toks} leaves no room for a context in "
                                   f"the model's max_length={lm.max_length}")
            contexts = [requests[p].args[0] for p in positions]
            batch = [engine.Request(_context_ids(lm, context, has_bos_prefix)[-max_context:], max_gen_toks, tuple(until))
                     for context in contexts]
            sampling = None
            if kwargs.get("do_sample"):
                sampling = sampling_settings(model, temperature=kwargs.get("temperature"), top_k=kwargs.get("top_k"),
                                             top_p=kwargs.get("top_p"), seed=torch.initial_seed())
            completions = engine.run(model, tokenizer, batch, eos_token_ids=eos_token_ids(model, tokenizer),
                                     sampling=sampling, slots=max(_batch_size(lm), engine.DEFAULT_SLOTS),
                                     on_done=lambda index, completion: bar.update(1))
            for position, context, completion in zip(positions, contexts, completions):
                tokens = completion.token_ids
                if isinstance(think_end, int) and think_end in tokens:
                    tokens = tokens[len(tokens) - tokens[::-1].index(think_end):]
                text = lm.tok_decode(tokens)
                if isinstance(think_end, int):
                    text = text.lstrip()
                text = postprocess_generated_text(generation=text, stop=until,
                                                  think_end_token=think_end if isinstance(think_end, str) else None)
                results[position] = text
                lm.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
    return results


def _context_ids(lm, context: str, has_bos_prefix) -> list[int]:
    """A context's token ids as ``HFLM.tok_batch_encode`` makes them (no BOS added to a context that starts with it)."""
    options = {}
    if has_bos_prefix(context, getattr(lm.tokenizer, "bos_token", None)):
        options = {"add_special_tokens": False}
    elif lm.add_bos_token is not None:
        options = {"add_special_tokens": lm.add_bos_token}
    return lm.tokenizer(context, **options)["input_ids"]


def _batch_size(lm) -> int:
    size = getattr(lm, "batch_size", 1)
    return size if isinstance(size, int) else 1
