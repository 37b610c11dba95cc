"""Log-likelihood of continuations with shared prefixes encoded once (our own code: neither lm-eval nor
transformers has a prefix-sharing scorer; lm-eval's ``HFLM`` re-encodes every context, and transformers only
offers the key/value cache classes this module builds on).

``score_continuations(model, [(context_ids, continuation_ids), ...])`` returns, per request, exactly what lm-eval's
``HFLM._loglikelihood_tokens`` returns for a causal model: the summed log-probability of the continuation tokens
given the context, and whether every continuation token is the argmax (``is_greedy``). Only float rounding differs
(other matrix shapes add up in another order): ≤ 2.1e-5 on SmolLM2-135M TruthfulQA requests in fp32, where lm-eval's
own batched forward differs from a one-request forward by up to 2.7e-5.

How the work is shared:

1. **Identical requests** are scored once, and requests whose model input is the same (``context +
   continuation[:-1]``: the one-token answers "1"/"2" of a judge, TruthfulQA's MC1 and MC2 choices of one question)
   share one *row*, read at several targets (lm-eval's ``logits_cache`` does the same for one-token continuations;
   where such a group mixes continuation lengths, lm-eval reads a shorter one at the group's first scored positions
   instead of its last, and this engine gives what ``HFLM(logits_cache=False)`` gives).
2. **Shared prefixes.** The part of each row that is not scored (for a plain request: ``context[:-1]``) is put in a
   radix tree. A tree node whose tokens would otherwise be fed to the model by several consumers (rows or cached
   descendants) is encoded once into a key/value cache when that saves at least ``MIN_SAVED_TOKENS`` token-feeds:
   TruthfulQA's six-shot primer once for all questions, each question once for all its choices, a judge's
   instruction preamble once for all items.
3. **Rows** are scored on top of their nearest cached prefix, longest first, up to ``batch_size`` to a forward:
   packed side by side into one sequence with a block-causal 4D attention mask and their own position ids (sdpa and
   eager attention; no padding is computed, at most ``PACK_TOKENS`` tokens), or else right-padded with an attention
   mask over the prefix cache expanded to the batch. The shared cache is never mutated: every forward gets a fresh
   ``transformers.DynamicCache`` over the shared tensors (its ``update`` concatenates into new tensors). Only the
   scored positions go through the output head and the vocabulary normalization (``logits_to_keep``).

**Sliding-window layers** (Gemma 3: five of six layers see 512 tokens; Mistral: all): the cache keeps every prefix token
(a ``DynamicCache`` built without a config has only full layers), and a layer's window is set by the mask. A row of at
most ``sliding_window`` tokens (its prefix included) attends exactly as under full attention — transformers'
``sliding_window_overlay`` lets position p see p - window + 1 .. p — so it is packed like any other (a 4D mask is used
as it is by every layer). A longer row is right-padded with a 2D mask: the model then builds each layer's own mask at
the row's true positions over the whole cache (``stats["rows_past_window"]`` counts them). Cached prefixes are encoded
without a mask, windowed the same way.

Fallbacks to one plain forward per row (lm-eval's own computation): a request longer than ``max_length + 1`` tokens
(lm-eval's left truncation: ``(context + continuation)[-(max_length + 1):][:-1]``), and every request when the model
cannot take a dynamic key/value cache (encoder-decoder, chunked or linear-attention layers, bidirectional attention,
a forward without ``past_key_values``) or a cached forward raises (then a warning names the reason and
``stats["fallback"]`` keeps it).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

from harness.errors import HarnessError

log = logging.getLogger("harness")

DEFAULT_BATCH_SIZE = 8  # rows per forward; memory grows with batch × (prefix + row) tokens × layers
MIN_SAVED_TOKENS = 48  # cache a shared prefix only if that saves ≥ this many token-feeds: a rough guess (not tuned)
#                        at what one more forward costs (Python, cache copy) in tokens of a ~100M model on CPU
PACK_TOKENS = 512  # tokens packed into one forward: attention there is quadratic in them, padding is not computed
ATTENTION_LAYERS = ("full_attention", "sliding_attention")  # layer_types this scorer caches; others fall back
PROGRESS = "Running loglikelihood requests"  # lm-eval's own bar name: the sweep's heartbeat reads it


@dataclass
class _Row:
    """One distinct model input and the requests read from it."""

    tokens: tuple[int, ...]  # fed to the model: (context + continuation)[:-1], left-truncated when too long
    scored: int = 0  # trailing positions whose next-token log-probs are read (the longest continuation)
    plain: bool = False  # scored by a plain forward: left-truncated (lm-eval's rule), or no cache in use
    requests: list[int] = field(default_factory=list)  # indices into the distinct requests

    @property
    def cacheable(self) -> int:
        """Leading tokens that may come from a shared cache (none of their outputs is read)."""
        return 0 if self.plain else len(self.tokens) - self.scored


@dataclass
class _Prefix:
    """A node of the radix tree of the rows' cacheable parts."""

    depth: int  # tokens in this prefix
    source: tuple[int, ...]  # a sequence that starts with this prefix
    children: list["_Prefix"] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows whose cacheable part is exactly this prefix
    cached: bool = False  # encoded once into a key/value cache
    consumers: int = 0  # forwards that would feed this node's last edge without a cache here


def cache_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot reuse a ``DynamicCache`` prefix for this scorer, or None when it can (full-attention and
    sliding-window layers: see ``attention_window``)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{type(model).__name__} does not take a dynamic key/value cache"
    if "past_key_values" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no past_key_values"
    text_config = _text_config(model)
    other = sorted({kind for kind in getattr(text_config, "layer_types", None) or ()} - set(ATTENTION_LAYERS))
    if other:
        return f"{type(model).__name__} has {', '.join(other)} layers"
    if getattr(text_config, "use_bidirectional_attention", False) or not getattr(text_config, "is_causal", True):
        return f"{type(model).__name__} attends bidirectionally"
    window = attention_window(model)
    sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or ()) or window is not None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        return f"{type(model).__name__} has sliding-window layers without a window size (sliding_window={window!r})"
    return None


def attention_window(model) -> int | None:
    """The ``sliding_window`` of ``model``'s sliding-window layers in tokens, or None when every layer attends to its
    whole context. A query at position p sees the keys at positions p - window + 1 .. p (transformers'
    ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``), so a row of at most ``window`` tokens (positions
    0 .. window - 1, its cached prefix included) attends exactly as under full attention."""
    text_config = _text_config(model)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return getattr(text_config, "sliding_window", None)  # Mistral-style configs: every layer, without layer_types


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def packing_attention(model) -> str | None:
    """The attention kind (``"sdpa"`` or ``"eager"``) under which ``model`` honours a custom block-causal 4D mask with
    explicit position ids, or None (other kernels take only 2D padding masks: rows are then padded)."""
    kind = getattr(model.config, "_attn_implementation", None)
    return kind if kind in ("sdpa", "eager") else None


def score_continuations(model, requests, *, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                        prefix_cache: bool = True, packing: bool = True, softmax_dtype=None, autocast_dtype=None,
                        progress: str | None = PROGRESS, stats: dict | None = None,
                        threads: int | None = None) -> list[tuple[float, bool]]:
    """``(summed log-prob of the continuation, is_greedy)`` of each ``(context_ids, continuation_ids)`` request under
    the causal LM ``model``, in request order, as lm-eval's ``HFLM._loglikelihood_tokens`` defines them.

    ``batch_size``: rows per forward (results do not depend on it beyond float rounding). ``max_length``: the
    model's context window; longer requests are left-truncated like lm-eval (None: never truncate).
    ``prefix_cache=False`` scores every row by a plain forward (no cache, no packing). ``packing=False`` pads rows
    into a batch instead of packing them into one sequence. ``softmax_dtype`` / ``autocast_dtype``: lm-eval's
    ``softmax_dtype`` / ``mixed_precision_dtype`` (None: the model's dtype). ``progress``: the tqdm bar's name
    (None: no bar). ``stats``, when given, is filled with counts of the work done (requests, rows, cached
    prefixes, forwards, tokens fed, positions computed with padding), ``window`` (the model's sliding window or None),
    ``rows_past_window`` (rows padded, not packed, for being longer than it) and ``fallback`` (why the cache was not
    used, or None).
    ``threads``: torch threads while scoring (None: the cores other processes leave free, rechecked between forwards —
    the generation engine's ``ThreadPolicy``; two threads on cores other work keeps busy run several times slower).
    """
    import torch

    from harness.evaluate.continuous_batching import ThreadPolicy

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HarnessError(f"batch_size={batch_size!r} must be a positive number of rows")
    distinct: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    owner = []
    for context, continuation in requests:
        context, continuation = tuple(int(t) for t in context), tuple(int(t) for t in continuation)
        if not context or not continuation:
            raise HarnessError(f"a log-likelihood request needs a non-empty context and continuation "
                               f"(got {len(context)} and {len(continuation)} tokens)")
        if max_length is not None and len(continuation) > max_length:
            raise HarnessError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                               f"{max_length}-token window")
        owner.append(distinct.setdefault((context, continuation), len(distinct)))
    pairs = list(distinct)
    reason = None if prefix_cache else "prefix_cache=False"
    if reason is None:
        reason = cache_unsupported_reason(model)
    counts = {"requests": len(owner), "distinct": len(pairs), "rows": 0, "cached_prefixes": 0, "forwards": 0,
              "tokens_fed": 0, "positions": 0, "packing": None, "fallback": reason}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(owner), desc=progress or PROGRESS, disable=progress is None)
    weight = [0] * len(pairs)  # original requests per distinct one: what the bar counts
    for index in owner:
        weight[index] += 1
    was_training = model.training
    model.eval()
    policy = ThreadPolicy(threads)
    policy.apply(force=True)
    try:
        with torch.no_grad(), (torch.autocast(device_type=_device(model).type, dtype=autocast_dtype)
                               if autocast_dtype is not None else nullcontext()):
            try:
                packs = packing and reason is None and autocast_dtype is None
                scores = _Scorer(model, pairs, weight, bar, counts, softmax_dtype, packs, policy).run(
                    batch_size, max_length, use_cache=reason is None)
            except (TypeError, ValueError, NotImplementedError, IndexError, AttributeError) as error:
                if reason is not None:
                    raise
                counts.update(fallback=f"a cached forward failed: {type(error).__name__}: {error}".splitlines()[0],
                              rows=0, cached_prefixes=0, forwards=0, tokens_fed=0, positions=0)
                log.warning("log-likelihood engine: %s; scoring with plain forwards", counts["fallback"])
                bar.reset(total=len(owner))
                scores = _Scorer(model, pairs, weight, bar, counts, softmax_dtype, False, policy).run(
                    batch_size, max_length, use_cache=False)
    finally:
        bar.close()
        model.train(was_training)
        policy.restore()
    counts["threads"] = policy.history or [(None, policy.fixed)]  # (other processes' load in cores, threads)
    if stats is not None:
        stats.update(counts)
    return [scores[index] for index in owner]


def _device(model):
    return next(model.parameters()).device


class _Scorer:
    """One scoring pass: plan rows and cached prefixes, then run them depth-first."""

    def __init__(self, model, pairs, weight, bar, counts, softmax_dtype, packing: bool, policy=None):
        self.model, self.pairs, self.weight, self.bar, self.counts = model, pairs, weight, bar, counts
        self.policy = policy  # ThreadPolicy: applied again before each forward (it rechecks the load every few s)
        self.softmax_dtype = softmax_dtype
        self.device = _device(model)
        parameters = inspect.signature(model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters
        self.packs = packing_attention(model) if packing and "position_ids" in parameters else None
        self.window = attention_window(model)
        counts["packing"] = self.packs
        counts["window"] = self.window
        counts["rows_past_window"] = 0  # rows longer than the sliding window: padded, the model applies its window
        self.scores: list[tuple[float, bool] | None] = [None] * len(pairs)

    def run(self, batch_size: int, max_length: int | None, use_cache: bool) -> list[tuple[float, bool]]:
        rows = self._rows(max_length, use_cache)
        root = self._tree(rows)
        self.counts["rows"] = len(rows)
        stack = [(root, None, None)]  # (cached node, its nearest cached ancestor, that ancestor's cache)
        while stack:
            node, parent, parent_cache = stack.pop()
            cache = None if parent is None else self._extend(parent_cache, node.source[parent.depth: node.depth])
            attached, below = _attached(node)
            for batch, packed in self._batches([rows[r] for r in attached], node.depth, batch_size):
                if self.policy is not None:
                    self.policy.apply()
                self._score_batch(cache, node.depth, batch, packed)
            stack += [(child, node, cache) for child in reversed(below)]
        return self.scores  # type: ignore[return-value]

    def _rows(self, max_length: int | None, use_cache: bool) -> list[_Row]:
        by_input: dict[tuple[int, ...], _Row] = {}
        for index, (context, continuation) in enumerate(self.pairs):
            whole = context + continuation
            truncated = max_length is not None and len(whole) > max_length + 1
            tokens = whole[-(max_length + 1):][:-1] if truncated else whole[:-1]
            row = by_input.setdefault(tokens, _Row(tokens))
            row.scored = max(row.scored, len(continuation))
            row.plain = row.plain or truncated or not use_cache
            row.requests.append(index)
        return list(by_input.values())

    def _tree(self, rows: list[_Row]) -> _Prefix:
        """The radix tree of the rows' cacheable parts (built from the sorted keys, one stack), with ``cached``
        set bottom-up where a cache saves at least ``MIN_SAVED_TOKENS`` token-feeds."""
        root = _Prefix(depth=0, source=())
        by_key: dict[tuple[int, ...], list[int]] = {}
        for index, row in enumerate(rows):
            if row.cacheable > 0:
                by_key.setdefault(row.tokens[: row.cacheable], []).append(index)
            else:
                root.rows.append(index)
        stack, previous = [root], ()
        for key in sorted(by_key):
            shared = 0
            limit = min(len(key), len(previous))
            while shared < limit and key[shared] == previous[shared]:
                shared += 1
            last = None
            while stack[-1].depth > shared:
                last = stack.pop()
            if stack[-1].depth < shared:  # split the edge to `last` at the shared depth
                middle = _Prefix(depth=shared, source=last.source, children=[last])
                stack[-1].children[-1] = middle
                stack.append(middle)
            node = _Prefix(depth=len(key), source=key)
            stack[-1].children.append(node)
            stack.append(node)
            node.rows += by_key[key]
            previous = key
        # bottom-up: a node is cached when the forwards that would feed its edge save enough by sharing it
        order, pending = [], [(root, 0)]
        while pending:
            node, parent_depth = pending.pop()
            order.append((node, parent_depth))
            pending += [(child, node.depth) for child in node.children]
        for node, parent_depth in reversed(order):
            node.consumers = len(node.rows) + sum(1 if child.cached else child.consumers for child in node.children)
            node.cached = node is not root and (node.consumers - 1) * (node.depth - parent_depth) >= MIN_SAVED_TOKENS
        root.cached = True  # the empty prefix: no cache, plain forwards
        return root

    def _extend(self, snapshot, tokens: tuple[int, ...]):
        """The cache of a longer prefix: ``tokens`` fed on top of ``snapshot`` (None: the empty prefix)."""
        import torch

        cache = _cache_over(snapshot, 1)
        extra = {"logits_to_keep": 1} if self.keeps_logits else {}
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), past_key_values=cache, use_cache=True,
                         **extra)
        self.counts["forwards"] += 1
        self.counts["tokens_fed"] += len(tokens)
        self.counts["cached_prefixes"] += 1
        return _snapshot(out.past_key_values)

    def _batches(self, rows: list[_Row], depth: int, batch_size: int) -> list[tuple[list[_Row], bool]]:
        """Rows longest first, ``batch_size`` to a forward, each batch with whether it is packed. A packed forward
        holds at most ``PACK_TOKENS`` tokens (or one longer row), and only rows that fit the sliding window (if any):
        its block-causal mask then stands for every layer. Longer rows are padded with a 2D mask, on which the model
        builds each layer's own mask at the rows' true positions (the cache keeps every prefix token)."""
        order = sorted(rows, key=lambda row: -len(row.tokens))
        fits = [self.packs is not None and (self.window is None or len(row.tokens) <= self.window) for row in order]
        packable = [row for row, fit in zip(order, fits) if fit]
        padded = [row for row, fit in zip(order, fits) if not fit]
        if self.packs is not None:
            self.counts["rows_past_window"] += len(padded)
        batches = [(padded[start: start + batch_size], False) for start in range(0, len(padded), batch_size)]
        tokens = 0
        for row in packable:
            length = len(row.tokens) - depth
            if not batches or not batches[-1][1] or len(batches[-1][0]) == batch_size or tokens + length > PACK_TOKENS:
                batches.append(([], True))
                tokens = 0
            batches[-1][0].append(row)
            tokens += length
        return batches

    def _padded(self, snapshot, depth: int, rows: list[_Row], tails: list[tuple[int, ...]]):
        """One right-padded row per input over the prefix cache expanded to the batch."""
        import torch

        width = max(len(tail) for tail in tails)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), depth + width), dtype=torch.long)
        mask[:, :depth] = 1
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (row, tail) in enumerate(zip(rows, tails)):
            ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            mask[r, depth: depth + len(tail)] = 1
            scored[r, len(tail) - row.scored: len(tail)] = True
        arguments = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if snapshot is not None:
            arguments["past_key_values"] = _cache_over(snapshot, len(rows))
        return arguments, scored

    def _packed(self, snapshot, depth: int, rows: list[_Row], tails: list[tuple[int, ...]]):
        """All inputs side by side in one sequence over the prefix cache: each attends to the prefix and to its own
        earlier tokens (a block-causal 4D mask) at its own positions, so no padding is computed."""
        import torch

        lengths = torch.tensor([len(tail) for tail in tails])
        total = int(lengths.sum())
        ids = torch.tensor([[token for tail in tails for token in tail]], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        segment = torch.repeat_interleave(torch.arange(len(tails)), lengths)
        local = torch.arange(total) - starts[segment]
        here = torch.arange(total)
        allowed = torch.cat([torch.ones((total, depth), dtype=torch.bool),
                             (segment[:, None] == segment[None, :]) & (here[:, None] >= here[None, :])], dim=1)
        if self.packs == "sdpa":
            mask = allowed[None, None]
        else:  # eager attention adds the mask to the scores
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros((1, 1, total, depth + total), dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        scored = torch.zeros((1, total), dtype=torch.bool)
        for row, start, length in zip(rows, starts.tolist(), lengths.tolist()):
            scored[0, start + length - row.scored: start + length] = True
        arguments = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                     "position_ids": (local + depth)[None].to(self.device)}
        if snapshot is not None:
            arguments["past_key_values"] = _cache_over(snapshot, 1)
        return arguments, scored

    def _score_batch(self, snapshot, depth: int, rows: list[_Row], packed: bool) -> None:
        import torch

        tails = [row.tokens[depth:] for row in rows]
        packed = packed and len(rows) > 1  # one row has no padding to save
        arguments, scored = (self._packed if packed else self._padded)(snapshot, depth, rows, tails)
        arguments["use_cache"] = snapshot is not None
        if self.keeps_logits:
            arguments["logits_to_keep"] = scored.to(self.device)
        logits = self.model(**arguments).logits
        self.counts["forwards"] += 1
        self.counts["tokens_fed"] += sum(len(tail) for tail in tails)
        self.counts["positions"] += scored.numel()
        if logits.dim() == 3:  # a model that ignores logits_to_keep or has none: every position came back
            logits = logits[scored.to(self.device)]
        if logits.shape[0] != int(scored.sum()):
            raise ValueError(f"expected {int(scored.sum())} scored positions, the model returned {logits.shape[0]}")
        # log_softmax as lm-eval computes it: an fp32 logsumexp over the 49k-wide vocabulary rounds differently (~1e-4)
        logps = torch.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        greedy = logps.argmax(dim=-1)
        positions, targets, owners, requests = [], [], [], []
        offset = 0
        for row in rows:
            for index in row.requests:
                continuation = self.pairs[index][1]
                first = offset + row.scored - len(continuation)
                positions += range(first, first + len(continuation))
                targets += continuation
                owners += [len(requests)] * len(continuation)
                requests.append(index)
            offset += row.scored
        positions_t = torch.tensor(positions, device=logits.device)
        targets_t = torch.tensor(targets, device=logits.device)
        owners_t = torch.tensor(owners, device=logits.device)
        token_logps = logps[positions_t, targets_t]
        sums = torch.zeros(len(requests), dtype=token_logps.dtype, device=logits.device).index_add_(
            0, owners_t, token_logps)
        misses = torch.zeros(len(requests), dtype=torch.long, device=logits.device).index_add_(
            0, owners_t, (greedy[positions_t] != targets_t).long())
        for index, total, missed in zip(requests, sums.tolist(), misses.tolist()):
            self.scores[index] = (float(total), missed == 0)
            self.bar.update(self.weight[index])


def _attached(node: _Prefix) -> tuple[list[int], list[_Prefix]]:
    """Rows scored on ``node``'s cache (its own and those of uncached descendants) and its nearest cached
    descendants."""
    rows, cached, pending = list(node.rows), [], list(node.children)
    while pending:
        child = pending.pop()
        if child.cached:
            cached.append(child)
        else:
            rows += child.rows
            pending += child.children
    return rows, cached


def _snapshot(cache) -> tuple:
    """The per-layer (keys, values) tensors of a filled cache: shared, never written again."""
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _cache_over(snapshot, batch: int):
    """A fresh ``DynamicCache`` holding ``snapshot`` repeated ``batch`` times (None: an empty one). Its updates
    concatenate into new tensors, so ``snapshot`` stays as it is."""
    from transformers import DynamicCache

    if snapshot is None:
        return DynamicCache()
    return DynamicCache([(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
                         for keys, values in snapshot])
