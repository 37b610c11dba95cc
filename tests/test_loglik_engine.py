"""harness.evaluate.loglik (the prefix-sharing log-likelihood engine) and HarnessLM give lm-eval's HFLM numbers.

Fast tests use the varied tiny random Llama (different greedy tokens per input, so ``is_greedy`` is not vacuous);
the slow test scores a few TruthfulQA questions on the embedded SmolLM2-135M by both engines.
"""

from __future__ import annotations

import math
import random

import pytest

from conftest import DATA_MIRROR
from harness.errors import HarnessError

TOLERANCE = 1e-4  # fp32: a cached prefix adds up attention in another order than a full forward
MC_FILE = DATA_MIRROR / "truthfulqa" / "mc_task.json"
SPLIT_INPUT = (39, 40)  # indices of the crafted requests with one input split two ways
needs_mirror = pytest.mark.skipif(not MC_FILE.is_file(), reason=f"offline data mirror not found at {MC_FILE}")


@pytest.fixture(scope="module")
def backends(varied_tiny_model):
    """lm-eval's stock HFLM and our HarnessLM on the same checkpoint, with a 96-token window."""
    from lm_eval.models.huggingface import HFLM

    from harness.evaluate.lm_backend import HarnessLM

    options = dict(pretrained=str(varied_tiny_model), device="cpu", batch_size=4, dtype="float32", max_length=96)
    return HFLM(**options), HarnessLM(**options)


def greedy_tokens(model, context: list[int], count: int) -> list[int]:
    import torch

    tokens = list(context)
    with torch.no_grad():
        for _ in range(count):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(context):]


def crafted_requests(model) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Shared and unshared prefixes, duplicates, one-token continuations, a context inside another, a one-token
    context, inputs shared by different splits, greedy continuations and requests longer than the window."""
    draw = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [draw.randrange(5, 40000) for _ in range(n)]

    primer = tokens(60)
    contexts = [primer + tokens(draw.randrange(8, 16)) for _ in range(4)]
    contexts += [contexts[0][:-4], tokens(1), tokens(25)]  # inside another context; one token; unshared
    pairs = []
    for context in contexts:
        for length in (1, 1, 2, 4):
            pairs.append((context, tokens(length)))
        pairs.append((context, greedy_tokens(model, context, 3)))  # is_greedy: True
    pairs.append((contexts[1], greedy_tokens(model, contexts[1], 1)))  # one token, greedy
    pairs += [pairs[0], pairs[7], pairs[7]]  # duplicates
    whole = contexts[2] + tokens(3)
    assert len(pairs) == SPLIT_INPUT[0]
    pairs += [(whole[:-1], whole[-1:]), (whole[:-2], whole[-2:])]  # the same input read at 1 and 2 positions
    long_context = tokens(110)
    pairs += [(long_context, tokens(3)), (long_context, greedy_tokens(model, long_context[-95:], 2)),
              (tokens(90), tokens(12))]  # longer than max_length + 1 = 97: lm-eval's left truncation
    return [((f"context {i}", f"continuation {i}"), list(c), list(x)) for i, (c, x) in enumerate(pairs)]


def without_logits_cache(stock, requests) -> list[tuple[float, bool]]:
    """HFLM's scores with its one-token logits cache off: it misreads SPLIT_INPUT[0] (see the engine's docstring)."""
    stock.logits_cache = False
    try:
        return stock._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        stock.logits_cache = True


@pytest.fixture(scope="module")
def requests(backends):
    return crafted_requests(backends[0].model)


def test_engine_matches_lm_eval_hflm(backends, requests):
    stock, ours = backends
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    expected = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    exact = without_logits_cache(stock, requests)
    assert len(got) == len(expected) == len(exact) == len(requests)
    for index, ((logp, greedy), (stock_logp, stock_greedy), (exact_logp, exact_greedy)) in enumerate(
            zip(got, expected, exact)):
        assert abs(logp - exact_logp) <= TOLERANCE and greedy == exact_greedy
        if index != SPLIT_INPUT[0]:
            assert abs(logp - stock_logp) <= TOLERANCE and greedy == stock_greedy
    assert abs(expected[SPLIT_INPUT[0]][0] - exact[SPLIT_INPUT[0]][0]) > 1e-3  # the lm-eval quirk is real here
    assert 5 <= sum(greedy for _, greedy in exact) < len(exact)  # both kinds of is_greedy are exercised
    stats = ours.last_stats
    assert stats["fallback"] is None and stats["cached_prefixes"] >= 2  # the primer, then contexts
    assert stats["distinct"] == len(requests) - 3 and stats["rows"] < stats["distinct"]  # duplicates, shared inputs
    assert stats["tokens_fed"] < sum(len(c) + len(x) for _, c, x in requests) / 3


def test_rolling_and_string_requests_match_lm_eval(backends):
    """lm-eval's own entry points (``loglikelihood`` tokenizes, ``loglikelihood_rolling`` cuts 96-token windows) reach
    the engine through ``_loglikelihood_tokens``."""
    from lm_eval.api.instance import Instance

    stock, ours = backends
    text = " ".join(f"Sentence {i} says something about the number {i * 7}." for i in range(30))
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, (text[:90],), 1)]
    for expected, got in zip(stock.loglikelihood_rolling(rolling, disable_tqdm=True),
                             ours.loglikelihood_rolling(rolling, disable_tqdm=True)):
        assert got == pytest.approx(expected, rel=1e-6, abs=TOLERANCE)  # a -7416 sum in fp32: its last bit is 5e-4
    prompt = "Question: what colour is the sky?\nAnswer:"
    pairs = [Instance("loglikelihood", {}, (context, answer), i) for i, (context, answer) in
             enumerate([(prompt, " blue"), (prompt, " green"), (prompt, " a pale blue in the morning"), ("", "Hello")])]
    for (expected, expected_greedy), (got, greedy) in zip(stock.loglikelihood(pairs, disable_tqdm=True),
                                                          ours.loglikelihood(pairs, disable_tqdm=True)):
        assert abs(got - expected) <= TOLERANCE and greedy == expected_greedy


def test_batch_size_packing_and_cache_do_not_change_results(backends, requests, varied_tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from harness.evaluate.loglik import score_continuations

    model = backends[1].model
    eager = AutoModelForCausalLM.from_pretrained(varied_tiny_model, dtype=torch.float32, attn_implementation="eager")
    pairs = [(context, continuation) for _, context, continuation in requests]
    reference = score_continuations(model, pairs, batch_size=4, max_length=96, progress=None)
    variants = {}
    for name, chosen, options in [("batch 1", model, {"batch_size": 1}), ("batch 3", model, {"batch_size": 3}),
                                  ("batch 64", model, {"batch_size": 64}),
                                  ("padded", model, {"batch_size": 5, "packing": False}),
                                  ("eager", eager, {"batch_size": 6}),
                                  ("plain", model, {"batch_size": 5, "prefix_cache": False})]:
        stats: dict = {}
        variants[name] = (score_continuations(chosen, pairs, max_length=96, progress=None, stats=stats, **options), stats)
    for name, (variant, _) in variants.items():
        for (logp, greedy), (reference_logp, reference_greedy) in zip(variant, reference):
            assert abs(logp - reference_logp) <= TOLERANCE and greedy == reference_greedy, name
    packing = {name: stats["packing"] for name, (_, stats) in variants.items()}
    assert packing == {"batch 1": "sdpa", "batch 3": "sdpa", "batch 64": "sdpa", "padded": None, "eager": "eager",
                       "plain": None}
    padded, packed = variants["padded"][1], variants["batch 64"][1]
    assert packed["positions"] < padded["positions"]  # packing computes no padding
    assert variants["plain"][1]["fallback"] == "prefix_cache=False" and variants["plain"][1]["cached_prefixes"] == 0


def test_a_model_that_refuses_the_cache_is_scored_by_plain_forwards(backends, requests):
    import torch

    from harness.evaluate.loglik import score_continuations

    class Refusing(torch.nn.Module):
        """Takes past_key_values in its signature but fails on a filled cache."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, logits_to_keep=0):
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise NotImplementedError("no cached prefixes here")
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                              use_cache=use_cache, logits_to_keep=logits_to_keep)

    stock, ours = backends
    pairs = [(context, continuation) for _, context, continuation in requests]
    stats: dict = {}
    got = score_continuations(Refusing(ours.model), pairs, batch_size=4, max_length=96, progress=None, stats=stats)
    assert "NotImplementedError: no cached prefixes here" in stats["fallback"] and stats["cached_prefixes"] == 0
    for (logp, greedy), (stock_logp, stock_greedy) in zip(got, without_logits_cache(stock, requests)):
        assert abs(logp - stock_logp) <= TOLERANCE and greedy == stock_greedy


WINDOW = 16  # the tiny sliding-window models' sliding_window


def tiny_sliding_model(family: str, attention: str, window: int = WINDOW):
    """A random Gemma3 (sliding and full layers mixed) or Mistral (every layer sliding) with a ``window``-token window;
    std 0.5 weights so the greedy tokens vary with the input."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, max_position_embeddings=256, initializer_range=0.5, tie_word_embeddings=False,
                 sliding_window=window, attn_implementation=attention)
    torch.manual_seed(0)
    if family == "gemma3":
        config = Gemma3TextConfig(num_hidden_layers=4, layer_types=["sliding_attention", "sliding_attention",
                                                                    "full_attention", "sliding_attention"], **shape)
        return Gemma3ForCausalLM(config).eval()
    return MistralForCausalLM(MistralConfig(num_hidden_layers=2, **shape)).eval()


def sliding_requests(model, primer_length: int, question_length: int) -> list[tuple[list[int], list[int]]]:
    """Three questions after a shared primer, four choices each (one of them the greedy continuation)."""
    draw = random.Random(primer_length)

    def tokens(n: int) -> list[int]:
        return [draw.randrange(3, 96) for _ in range(n)]

    primer = tokens(primer_length)
    pairs = []
    for _ in range(3):
        context = primer + tokens(question_length)
        pairs += [(context, tokens(1)), (context, tokens(2)), (context, tokens(3)),
                  (context, greedy_tokens(model, context, 2))]
    return pairs


@pytest.mark.parametrize("family, attention", [("gemma3", "sdpa"), ("gemma3", "eager"), ("mistral", "sdpa")])
def test_sliding_window_models_are_cached_and_match_plain_forwards(family, attention, monkeypatch):
    """Rows inside the window are packed over cached prefixes; rows past it (prefixes longer than the window among
    them) are padded over the cache, where the model applies its own window: both give the plain forwards' numbers."""
    from harness.evaluate import loglik
    from harness.evaluate.loglik import cache_unsupported_reason, score_continuations

    monkeypatch.setattr(loglik, "MIN_SAVED_TOKENS", 4)  # cache the short shared prefixes too
    model = tiny_sliding_model(family, attention)
    assert cache_unsupported_reason(model) is None and loglik.attention_window(model) == WINDOW
    short = sliding_requests(model, primer_length=6, question_length=4)  # rows of at most 12 tokens
    long = sliding_requests(model, primer_length=WINDOW + 4, question_length=5)  # rows of 25 to 27 tokens
    assert max(len(c) + len(x) - 1 for c, x in short) <= WINDOW < min(len(c) + len(x) - 1 for c, x in long)
    draw = random.Random(1)
    edge = [(short[0][0][:6] + [draw.randrange(3, 96) for _ in range(length - 7)], [5, 7])
            for length in (WINDOW, WINDOW + 1)]  # rows of exactly the window and one token more, packed together
    for pairs, past_window in [(short, 0), (long, 12), (short + long + edge, 13)]:
        plain = score_continuations(model, pairs, batch_size=1, prefix_cache=False, progress=None)
        stats: dict = {}
        got = score_continuations(model, pairs, batch_size=4, progress=None, stats=stats)
        for (logp, greedy), (plain_logp, plain_greedy) in zip(got, plain, strict=True):
            assert abs(logp - plain_logp) <= 1e-5 and greedy == plain_greedy
        assert 3 <= sum(greedy for _, greedy in plain) < len(plain)  # is_greedy is exercised both ways
        assert stats["fallback"] is None and stats["cached_prefixes"] >= 2 and stats["window"] == WINDOW
        assert stats["packing"] == attention and stats["rows_past_window"] == past_window
    # the window matters for the long rows: the same weights attending to everything score them otherwise
    unbounded = tiny_sliding_model(family, attention, window=128)
    unbounded.load_state_dict(model.state_dict())
    far = score_continuations(unbounded, long, batch_size=1, prefix_cache=False, progress=None)
    near = score_continuations(model, long, batch_size=1, prefix_cache=False, progress=None)
    assert max(abs(a - b) for (a, _), (b, _) in zip(far, near)) > 1e-3


def test_other_layer_kinds_are_not_cached():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from harness.evaluate.loglik import cache_unsupported_reason

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, sliding_window=8)
    bidirectional = Gemma3ForCausalLM(Gemma3TextConfig(use_bidirectional_attention=True, **shape))
    assert "bidirectionally" in cache_unsupported_reason(bidirectional)
    chunked = Gemma3ForCausalLM(Gemma3TextConfig(**shape))
    chunked.config.layer_types = ["chunked_attention", "full_attention"]
    assert "chunked_attention layers" in cache_unsupported_reason(chunked)
    unsized = Gemma3ForCausalLM(Gemma3TextConfig(**shape))
    unsized.config.sliding_window = None
    assert "without a window size" in cache_unsupported_reason(unsized)


def test_bad_requests_are_one_line_errors(backends):
    from harness.evaluate.loglik import score_continuations

    model = backends[1].model
    for pairs, options, message in [([([1, 2], [])], {}, "non-empty context and continuation"),
                                    ([([], [3])], {}, "non-empty context and continuation"),
                                    ([([1], list(range(5, 105)))], {"max_length": 96}, "does not fit"),
                                    ([([1], [2])], {"batch_size": 0}, "batch_size=0")]:
        with pytest.raises(HarnessError, match=message) as error:
            score_continuations(model, pairs, progress=None, **options)
        assert "\n" not in str(error.value)


def test_registered_with_lm_eval_and_engines_are_named():
    from lm_eval.api.registry import get_model

    from harness.evaluate.lm_backend import HarnessLM
    from harness.evaluate.task_support import make_lm

    assert get_model("harness") is HarnessLM
    with pytest.raises(HarnessError, match="engine='fast' is not an engine"):
        make_lm("/nowhere", device="cpu", batch_size=1, engine="fast")


def test_completion_logps_match_full_forwards(varied_tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from harness.evaluate.logprobs import completion_logps

    model = AutoModelForCausalLM.from_pretrained(varied_tiny_model, dtype=torch.float32).eval()
    draw = random.Random(1)
    prompts = [[draw.randrange(5, 40000) for _ in range(n)] for n in (70, 75, 3)]
    sequences = [(prompt, [draw.randrange(5, 40000) for _ in range(n)]) for prompt in prompts for n in (6, 9)]
    sequences += [([], [7, 8, 9]), ([], [7]), (prompts[0], [])]  # nothing predicts a first token without a prompt

    def direct(prompt, completion):
        ids = prompt + completion
        if len(ids) < 2 or not completion:
            return 0.0
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
        first = max(len(prompt), 1)
        return sum(logps[i - 1, ids[i]].item() for i in range(first, len(ids)))

    for batch_size in (1, 4):
        got = completion_logps(model, None, sequences, batch_size=batch_size)
        assert [n for _, n in got] == [len(c) for _, c in sequences]
        for (logp, _), (prompt, completion) in zip(got, sequences):
            assert logp == pytest.approx(direct(prompt, completion), abs=TOLERANCE)


def test_local_judge_reads_the_label_logits(varied_tiny_model):
    import torch

    from harness.evaluate.generation import format_prompt
    from harness.evaluate.judges import LOCAL_ANSWER_PREFIX, LocalHFJudge, judging_prompt

    judge = LocalHFJudge(str(varied_tiny_model), batch_size=3)
    model, tokenizer, (id_1, id_2) = judge.load()
    items = [("Name a colour.", "Blue.", "Seven."), ("Name a colour.", "Green, like grass.", "Red."),
             ("Add 2 and 2.", "4", "It is four, because two and two make four.")]
    for (p_1, method, raw), (instruction, first, second) in zip(judge._one_order(items), items):
        text = format_prompt(tokenizer, [{"role": "user", "content": judging_prompt(instruction, first, second, None)}],
                             use_chat_template=True) + LOCAL_ANSWER_PREFIX
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]
        assert method == "label_logits" and raw["prompt_tokens"] == len(ids)
        assert p_1 == pytest.approx(torch.softmax(last[[id_1, id_2]], dim=0)[0].item(), abs=1e-5)
        assert raw["label_mass"] == pytest.approx(torch.softmax(last, dim=0)[[id_1, id_2]].sum().item(), abs=1e-6)
        assert math.isclose(raw["logp_1"], torch.log_softmax(last, dim=0)[id_1].item(), abs_tol=TOLERANCE)


def truthfulqa_by_both_engines(model_path, tmp_path, limit: int, chat: bool) -> tuple[dict, dict]:
    from harness.evaluate.task_support import run_lm_eval
    from harness.protocols import Checkpoint, TaskContext
    from tasks.truthfulqa_mc import read_mirror, write_data_file, write_task_configs

    data_file, _ = write_data_file(read_mirror(MC_FILE)[:limit], tmp_path)
    task_files = write_task_configs(data_file, 0, tmp_path)
    checkpoint = Checkpoint(path=model_path, setting="instruct", use_chat_template=chat)
    context = TaskContext(data_mirror=DATA_MIRROR, cache_dir=tmp_path, device="cpu", batch_size=4)
    return tuple(run_lm_eval(checkpoint, context, task_files, engine=engine) for engine in ("hf", "harness"))


def assert_same_truthfulqa(old: dict, new: dict, questions: int) -> None:
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        assert new["results"][task]["acc,none"] == pytest.approx(old["results"][task]["acc,none"], abs=1e-6)
        by_doc = {s["doc_id"]: s for s in old["samples"][task]}
        assert len(new["samples"][task]) == questions
        for sample in new["samples"][task]:
            reference = by_doc[sample["doc_id"]]
            assert sample["arguments"] == reference["arguments"]
            for (logp, greedy), (old_logp, old_greedy) in zip(sample["filtered_resps"], reference["filtered_resps"],
                                                              strict=True):
                assert abs(logp - old_logp) <= TOLERANCE and greedy == old_greedy


@needs_mirror
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_truthfulqa_identical_by_both_engines(varied_tiny_model, tmp_path, chat):
    old, new = truthfulqa_by_both_engines(varied_tiny_model, tmp_path, limit=3, chat=chat)
    assert_same_truthfulqa(old, new, questions=3)


@pytest.mark.slow
@needs_mirror
def test_truthfulqa_identical_by_both_engines_on_the_embedded_model(cache_dir, tmp_path):
    from harness.inputs.models import materialize_embedded

    model = materialize_embedded("smollm2-135m-instruct", cache_dir)
    old, new = truthfulqa_by_both_engines(model, tmp_path, limit=3, chat=False)
    assert_same_truthfulqa(old, new, questions=3)


def test_threads_follow_the_policy_and_are_restored(backends, requests, monkeypatch):
    """A fixed ``threads`` is used and the caller's torch setting comes back; the automatic choice leaves out cores
    that other processes keep busy, and niced work only counts when the scheduler does not rank it below us."""
    import torch

    from harness.evaluate import continuous_batching
    from harness.evaluate.loglik import score_continuations

    model = backends[1].model
    pairs = [(context, continuation) for _, context, continuation in requests][:6]
    before = torch.get_num_threads()
    stats: dict = {}
    fixed = score_continuations(model, pairs, max_length=96, progress=None, stats=stats, threads=1)
    assert stats["threads"] == [(None, 1)] and torch.get_num_threads() == before
    two = score_continuations(model, pairs, max_length=96, progress=None, threads=2)  # other summation order only
    assert all(abs(a - b) <= TOLERANCE and g == h for (a, g), (b, h) in zip(fixed, two))
    with pytest.raises(HarnessError, match="threads=0"):
        score_continuations(model, pairs, max_length=96, progress=None, threads=0)

    monkeypatch.setattr(continuous_batching, "THREAD_PROBE_SECONDS", 0.0)
    samples = iter([(0.0, 0.0, 0.0), (1.0, 1.6, 0.1)])  # others used 1.5 cores of the last second
    monkeypatch.setattr(continuous_batching, "cpu_sample", lambda: next(samples))
    policy = continuous_batching.ThreadPolicy(None)
    policy.original, policy.cores = 2, 2
    assert policy.apply(force=True) == 1 and policy.history == [(1.5, 1)]
    policy.restore()

    monkeypatch.setattr(continuous_batching.os, "getpriority", lambda *_: 10)
    assert not continuous_batching._niced_work_yields()  # a niced sweep: every other process may outrank it
