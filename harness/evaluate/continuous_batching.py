"""A small continuous-batching generation engine for causal LMs on CPU (our own code; why below).

Every row stops on its own — at an end-of-sequence token, at a stop string, or after its ``max_new_tokens`` —
and its slot is refilled at once with the next prompt, so a batch never decodes for its slowest row.
The prompts' longest common token prefix (a chat template's system turn, a shared few-shot primer) is
encoded once and its keys/values are copied into each new row.

**Layout.** One preallocated key/value buffer per layer, ``[slots, kv_heads, capacity, head_dim]``
(``SlotCache``). Rows are right-aligned: every row's newest token sits in the same column ``end - 1``,
so a decode step writes one column for all rows in place (no ``torch.cat`` of the whole cache per step,
as ``DynamicCache`` does) and reads the window ``[end - longest row, end)`` as a view. A new prompt is
prefilled alone (no padding) straight into its slot, right-aligned at ``end``; a 4D additive mask hides
each row's columns left of its own start. Positions are per row, so a row's numbers are those of the
same prompt decoded alone (up to float summation order). When ``end`` reaches the buffer's capacity the
window is shifted left (once per ``COMPACTION_SLACK`` steps at most).

**Sampling** draws each row's tokens from its own ``torch.Generator`` seeded by (seed, request index):
a request's sample does not depend on which other prompts share its batch or on the slot count
(up to float summation order in the logits). Temperature / top-k / top-p are transformers' own
logits warpers.

**Threads** (``decode_threads``): on 2 cores shared with other jobs, two torch threads decode several
times slower than one (an OpenMP region waits for its slowest thread, and a thread that shares its core
with another process is descheduled half of the time). The engine measures the CPU time other
processes used over the last interval (``/proc/stat`` minus our own) and uses only the cores they
leave free, rechecked every ``THREAD_RECHECK_SECONDS``; ``threads=<n>`` overrides it.

**Why not transformers' own continuous batching** (``model.generate_batch`` /
``ContinuousBatchingManager``, transformers 5.23), read and measured at our sizes (CPU, fp32, sdpa):
without flash attention it packs all requests into one sequence with a dense
``[queries, all requests' keys]`` mask, so a decode step of N requests attends over every request's
keys (N× the attention work and mask memory); it has no stop strings (EOS token ids only); it samples
with one ``torch.multinomial`` over the whole batch on a background thread (a request's sample depends
on the batch); and its prefix sharing works in whole cache pages (256 tokens by default). README ("Generation
engine") has the measured numbers.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from harness.errors import HarnessError

DEFAULT_SLOTS = 32  # rows decoded together (fewer when the buffer cap says so); more rows, fewer steps (README)
KV_BUFFER_BYTES = 2 * 2**30  # cap on the key/value buffer; slots are reduced to fit (SmolLM2-135M: 46 KB a token)
COMPACTION_SLACK = 128  # spare columns in the buffer: the window is shifted left at most once per this many steps
THREAD_RECHECK_SECONDS = 5.0  # how often the automatic thread count looks at the machine's load again
THREAD_PROBE_SECONDS = 0.2  # the first look: other processes' CPU use over this long, before any work
OTHER_LOAD_MARGIN = 0.5  # a core counts as free when other processes use less than this share of it
SUPPORTED_ATTENTION = ("sdpa", "eager")  # implementations that take our additive 4D mask as is


@dataclass
class Request:
    """One prompt (token ids) to continue; ``stop`` strings end it as soon as the decoded text contains one."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass
class Sampling:
    """Multinomial sampling at ``temperature`` after top-k / top-p filtering (None: off); ``seed`` with the request's
    index seeds the request's own generator."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass
class Completion:
    """A request's generated tokens (the end-of-sequence token included when one ended it) and why it stopped."""

    token_ids: list[int]
    stopped_by: str  # "eos", "stop" (a stop string) or "length"


@dataclass
class _Row:
    index: int  # position of the request in the input list
    length: int  # tokens whose keys/values are in the buffer
    next_token: int  # sampled, not yet fed to the model
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class SlotLayer(CacheLayerMixin):
    """One layer's keys/values in the shared right-aligned layout of ``SlotCache``."""

    is_sliding = False

    def __init__(self, window: "SlotCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.window, self.keys, self.values, self.is_initialized = window, keys, values, True

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new columns of the rows being run and return their window (a view of the buffer)."""
        w = self.window
        rows, new = w.rows, key_states.shape[-2]
        self.keys[rows, :, w.end - new: w.end] = key_states
        self.values[rows, :, w.end - new: w.end] = value_states
        return self.keys[rows, :, w.start: w.end], self.values[rows, :, w.start: w.end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.end - self.window.start, 0

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class SlotCache(Cache):
    """Keys/values of ``slots`` rows, right-aligned in preallocated buffers (see the module docstring).

    Before each forward the engine sets ``rows`` (a slice of slots), ``start`` and ``end``: the model's new tokens
    are written to columns ``[end - new, end)`` and attention reads columns ``[start, end)``.
    """

    def __init__(self, config, slots: int, capacity: int, dtype: torch.dtype, device):
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        shape = (slots, kv_heads, capacity, head_dim)
        self.rows, self.start, self.end = slice(0, 0), 0, 0
        super().__init__(layers=[SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                           torch.zeros(shape, dtype=dtype, device=device))
                                 for _ in range(text.num_hidden_layers)])

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def copy_columns(self, source_rows, target_rows, source_start: int, target_start: int, width: int) -> None:
        """Copy ``width`` columns of ``source_rows`` (from ``source_start``) to ``target_rows`` (at ``target_start``)."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                block = buffer[source_rows, :, source_start: source_start + width].clone()
                buffer[target_rows, :, target_start: target_start + width] = block


def request_seed(seed: int, index: int) -> int:
    """The generator seed of request ``index`` under the run's ``seed`` (distinct pairs give unrelated streams)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix every sequence shares, at most the shortest length minus one (each row
    needs one token of its own to produce its first logits)."""
    if len(sequences) < 2:
        return 0
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


class ThreadPolicy:
    """The torch thread count for generation: the cores other processes leave free (see the module docstring), or a
    fixed ``threads``. ``apply`` sets it; ``restore`` puts back the caller's setting."""

    def __init__(self, threads: int | None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise HarnessError(f"generation threads={threads!r} must be a positive whole number or null (automatic)")
        self.fixed, self.original = threads, torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.last_check, self.last_sample, self.history = 0.0, None, []

    def apply(self, force: bool = False) -> int:
        now = time.monotonic()
        if self.fixed is not None:
            threads = self.fixed
        elif not force and now - self.last_check < THREAD_RECHECK_SECONDS:
            return torch.get_num_threads()
        else:
            if self.last_sample is None:  # first look: a short probe before any work of ours
                self.last_sample = cpu_sample()
                time.sleep(THREAD_PROBE_SECONDS)
            sample = cpu_sample()
            other = other_load(self.last_sample, sample)
            self.last_sample = sample
            threads = self.original if other is None else max(1, min(self.original, int(self.cores - other + 1 - OTHER_LOAD_MARGIN)))
            self.history.append((round(other, 2) if other is not None else None, threads))
        self.last_check = now
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def restore(self) -> None:
        if torch.get_num_threads() != self.original:
            torch.set_num_threads(self.original)


def cpu_sample() -> tuple[float, float, float] | None:
    """(wall seconds, machine busy CPU-seconds, this process's CPU-seconds), or None where /proc/stat is missing.

    Work of niced processes does not count as busy when the scheduler ranks them below this one: ``nice -n 19``
    background jobs leave both cores to a sweep at nice 0. Not when this process is itself niced, nor under
    autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``: each session gets a fair share whatever
    the niceness of its processes)."""
    try:
        with open("/proc/stat") as handle:
            fields = [float(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    niced = fields[1] if _niced_work_yields() else 0.0  # user time of niced processes
    busy = (sum(fields[:8]) - idle - niced) / tick  # user..steal; guest time is already inside user
    times = os.times()
    return time.monotonic(), busy, times.user + times.system


def _niced_work_yields() -> bool:
    """Whether other processes' niced work gives way to this process's threads (see ``cpu_sample``)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            return False
    except (AttributeError, OSError):
        return False
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as handle:
            return handle.read().strip() == "0"
    except OSError:
        return True  # no autogroup scheduling: niceness ranks processes machine-wide


def other_load(before, after) -> float | None:
    """Cores' worth of CPU other processes used between two ``cpu_sample`` readings."""
    if before is None or after is None or after[0] - before[0] <= 0:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def check_model(model) -> None:
    """The engine runs decoder-only models whose attention takes a 4D additive mask and whose layers all attend fully."""
    config = model.config.get_text_config()
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise HarnessError(f"generation engine: attention implementation {implementation!r} is not supported; "
                           f"load the model with attn_implementation in {SUPPORTED_ATTENTION}")
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        raise HarnessError("generation engine: models with sliding-window or non-attention layers are not supported")
    if getattr(model.config, "is_encoder_decoder", False):
        raise HarnessError("generation engine: encoder-decoder models are not supported")


def run(model, tokenizer, requests: list[Request], *, eos_token_ids: list[int], sampling: Sampling | None = None,
        slots: int = DEFAULT_SLOTS, threads: int | None = None, on_done=None,
        stats: dict | None = None) -> list[Completion]:
    """Generate for every request, in input order; greedy unless ``sampling``.

    ``tokenizer`` decodes rows with stop strings (``skip_special_tokens=True``, as the callers' final text);
    ``on_done(index, completion)`` is called as each request finishes (progress bars); ``stats``, when given, is
    filled with what the run did (slots, shared prefix tokens, decode steps, prefilled tokens, thread choices).
    """
    if not requests:
        return []
    for position, request in enumerate(requests):
        if not request.prompt_ids:
            raise HarnessError(f"generation engine: request {position} has an empty prompt")
    check_model(model)
    device, dtype = model.device, model.dtype
    eos = set(eos_token_ids)
    results: list[Completion | None] = [None] * len(requests)
    todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    for i in set(range(len(requests))) - set(todo):
        results[i] = Completion([], "length")
        if on_done:
            on_done(i, results[i])
    if not todo:
        return results
    prefix = common_prefix_length([requests[i].prompt_ids for i in todo])
    longest_prompt = max(len(requests[i].prompt_ids) for i in todo)
    longest_row = max(len(requests[i].prompt_ids) + requests[i].max_new_tokens for i in todo)
    capacity = longest_row + COMPACTION_SLACK
    per_row = capacity * SlotCache.bytes_per_token(model.config, dtype)
    slots = max(1, min(slots, len(todo), KV_BUFFER_BYTES // per_row))
    policy = ThreadPolicy(threads)
    warpers = _warpers(sampling)
    try:
        policy.apply(force=True)
        with torch.no_grad():
            cache = SlotCache(model.config, slots, capacity, dtype, device)
            prefix_kv = _encode_prefix(model, requests[todo[0]].prompt_ids[:prefix]) if prefix else None
            engine = _Engine(model, tokenizer, requests, cache, prefix, prefix_kv, eos, sampling, warpers)
            engine.end = longest_prompt
            queue = sorted(todo, key=lambda i: len(requests[i].prompt_ids))  # pop(): the longest prompt first

            def finish(index: int, done: Completion) -> None:
                results[index] = done
                if on_done:
                    on_done(index, done)

            active: list[_Row | None] = []  # by slot; None: a finished row's slot, to refill
            while queue or any(active):
                policy.apply()
                free = [slot for slot, row in enumerate(active) if row is None] + list(range(len(active), slots))
                for slot in free:  # refill every free slot before the next decode step
                    row = None
                    while queue and row is None:
                        index = queue.pop()
                        started = time.perf_counter()
                        row = engine.prefill(index, slot)
                        engine.seconds["prefill"] += time.perf_counter() - started
                        done = engine.finished(row)
                        if done:  # ended on its first token: the slot takes the next prompt
                            finish(index, done)
                            row = None
                    if slot < len(active):
                        active[slot] = row
                    elif row is not None:
                        active.append(row)
                if not queue and None in active:  # nothing left to refill with: close the gaps
                    active = engine.compact_rows(active)
                if not active:
                    continue
                started = time.perf_counter()
                engine.decode(active, longest_queued=_longest(requests, queue))
                engine.seconds["decode"] += time.perf_counter() - started
                for slot, row in enumerate(active):
                    done = engine.finished(row)
                    if done:
                        finish(row.index, done)
                        active[slot] = None
                while active and active[-1] is None:
                    active.pop()
    finally:
        policy.restore()
    if stats is not None:
        stats.update(slots=slots, shared_prefix_tokens=prefix, decode_steps=engine.steps,
                     prefill_tokens=engine.prefill_tokens + prefix,
                     seconds={k: round(v, 2) for k, v in engine.seconds.items()},
                     threads=policy.history or [(None, policy.fixed)])  # (other processes' load in cores, threads)
    return results


def _longest(requests: list[Request], queue: list[int]) -> int:
    return max((len(requests[i].prompt_ids) for i in queue), default=0)


def _warpers(sampling: Sampling | None):
    """transformers' own temperature / top-k / top-p warpers, in the order ``generate`` applies them."""
    if sampling is None:
        return None
    if not sampling.temperature or sampling.temperature <= 0:
        raise HarnessError(f"generation engine: sampling needs a temperature > 0, not {sampling.temperature!r} "
                           f"(greedy decoding is do_sample=false)")
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if sampling.temperature is not None and sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if sampling.top_k is not None:
        warpers.append(TopKLogitsWarper(int(sampling.top_k)))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(sampling.top_p)))
    return warpers


def _encode_prefix(model, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values ``[1, kv_heads, len, head_dim]`` per layer of the shared prefix, computed once."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], device=model.device)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


class _Engine:
    """The per-run state of ``run``: the buffer window and the steps that move it."""

    def __init__(self, model, tokenizer, requests, cache: SlotCache, prefix: int, prefix_kv, eos: set[int],
                 sampling: Sampling | None, warpers):
        self.model, self.tokenizer, self.requests, self.cache = model, tokenizer, requests, cache
        self.prefix, self.prefix_kv, self.eos, self.sampling, self.warpers = prefix, prefix_kv, eos, sampling, warpers
        self.end, self.steps, self.prefill_tokens = 0, 0, 0
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.capacity = cache.layers[0].keys.shape[-2]
        self.mask_value = torch.finfo(model.dtype).min

    def prefill(self, index: int, slot: int) -> _Row:
        """Encode request ``index`` alone into ``slot``, right-aligned at ``end``; sample its first token."""
        prompt = self.requests[index].prompt_ids
        begin = self.end - len(prompt)
        cache = self.cache
        if self.prefix:
            for layer, (keys, values) in zip(cache.layers, self.prefix_kv):
                layer.keys[slot, :, begin: begin + self.prefix] = keys[0]
                layer.values[slot, :, begin: begin + self.prefix] = values[0]
        suffix = prompt[self.prefix:]
        cache.rows, cache.start, cache.end = slice(slot, slot + 1), begin, self.end
        width, new = len(prompt), len(suffix)
        # causal within the row: query q (column begin + prefix + q) sees columns <= its own
        mask = torch.full((new, width), self.mask_value, dtype=self.model.dtype, device=self.model.device)
        mask = torch.triu(mask, diagonal=self.prefix + 1)[None, None]
        positions = torch.arange(self.prefix, len(prompt), device=self.model.device)[None]
        logits = self.model(input_ids=torch.tensor([suffix], device=self.model.device), position_ids=positions,
                            attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        self.prefill_tokens += new
        row = _Row(index=index, length=len(prompt), next_token=0)
        if self.sampling is not None:
            row.generator = torch.Generator(device=self.model.device)
            row.generator.manual_seed(request_seed(self.sampling.seed, index))
        row.next_token = self._choose(logits[:, -1, :].float(), [row])[0]
        row.generated.append(row.next_token)
        return row

    def decode(self, active: list[_Row], longest_queued: int) -> None:
        """Feed every active row its newest token (one column for all) and choose the next ones."""
        if self.end + 1 > self.capacity:
            self._shift_window(active, longest_queued)
        count = len(active)
        self.steps += 1
        lengths = torch.tensor([row.length for row in active], device=self.model.device)
        self.end += 1
        start = self.end - 1 - int(lengths.max())
        cache = self.cache
        cache.rows, cache.start, cache.end = slice(0, count), start, self.end
        columns = torch.arange(start, self.end, device=self.model.device)
        hidden = columns[None, :] < (self.end - 1 - lengths)[:, None]  # left of a row's first token
        mask = torch.zeros(hidden.shape, dtype=self.model.dtype, device=self.model.device)
        mask.masked_fill_(hidden, self.mask_value)
        tokens = torch.tensor([[row.next_token] for row in active], device=self.model.device)
        logits = self.model(input_ids=tokens, position_ids=lengths[:, None], attention_mask=mask[:, None, None, :],
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        chosen = self._choose(logits[:, -1, :].float(), active)
        for row, token in zip(active, chosen):
            row.length += 1
            row.next_token = token
            row.generated.append(token)

    def _choose(self, scores: torch.Tensor, rows: list[_Row]) -> list[int]:
        if self.sampling is None:
            return scores.argmax(dim=-1).tolist()
        scores = self.warpers(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return [int(torch.multinomial(probs[k], 1, generator=row.generator)) for k, row in enumerate(rows)]

    def finished(self, row: _Row) -> Completion | None:
        """The completion if ``row`` just ended (EOS token, stop string, length), else None."""
        request = self.requests[row.index]
        if row.generated[-1] in self.eos:
            return Completion(list(row.generated), "eos")
        if request.stop:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            if any(marker and marker in text for marker in request.stop):
                return Completion(list(row.generated), "stop")
        if len(row.generated) >= request.max_new_tokens:
            return Completion(list(row.generated), "length")
        return None

    def compact_rows(self, active: list[_Row | None]) -> list[_Row]:
        """Move the rows into slots ``0..n-1`` (the last rows fill the finished rows' slots)."""
        keep = [row for row in active if row is not None]
        longest = max((row.length for row in keep), default=0)
        moving = [slot for slot in range(len(keep), len(active)) if active[slot] is not None]
        holes = [slot for slot in range(len(keep)) if active[slot] is None]
        for source, target in zip(moving, holes):
            self.cache.copy_columns(slice(source, source + 1), slice(target, target + 1),
                                    self.end - longest, self.end - longest, longest)
            active[target], active[source] = active[source], None
        return active[: len(keep)]

    def _shift_window(self, active: list[_Row], longest_queued: int) -> None:
        """Move every row's columns left so that ``end`` leaves room again (and still fits the longest queued prompt)."""
        longest = max(row.length for row in active)
        new_end = max(longest, longest_queued)
        shift = self.end - new_end
        if shift <= 0:
            raise HarnessError("generation engine: the key/value buffer is full (a row outgrew its planned length)")
        count = len(active)
        self.cache.copy_columns(slice(0, count), slice(0, count), self.end - longest, new_end - longest, longest)
        self.end = new_end
