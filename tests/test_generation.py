"""harness.evaluate.generation on the continuous-batching engine: greedy parity with ``model.generate`` row by row,
stop strings, more prompts than slots, sampling seeded per prompt, lm-eval ``generate_until`` parity, the thread
policy. Fast tests use the 2-layer random Llama whose outputs vary with the prompt (``varied_tiny_model``); one slow
test uses the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.evaluate import continuous_batching as engine
from harness.evaluate.generation import (cut_at_stop, format_prompt, generate, generate_until, load_for_generation,
                                        sampling_settings)

PROMPTS = [
    "The weather today is",
    "Once upon a time, in a land far away, there lived a",
    "def add(a, b):",
    "Question: what is two plus two?\nAnswer:",
    "A",
    "The weather tomorrow will be cold and the wind will",
    "Lists: one, two, three,",
]


@pytest.fixture(scope="module")
def loaded(varied_tiny_model):
    torch.manual_seed(0)
    return load_for_generation(varied_tiny_model)


def reference(model, tokenizer, prompts, max_new_tokens, eos=None):
    """``model.generate`` greedy, one prompt at a time: generated token ids per prompt (EOS included)."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos if eos is not None else model.generation_config.eos_token_id)
        tokens = out[0, ids.shape[1]:].tolist()
        stop_at = eos if eos is not None else model.generation_config.eos_token_id
        if stop_at in tokens:
            tokens = tokens[: tokens.index(stop_at) + 1]
        outputs.append(tokens)
    return outputs


def requests(tokenizer, prompts, max_new_tokens, stop=()):
    return [engine.Request(tokenizer(p, add_special_tokens=False)["input_ids"], max_new_tokens, tuple(stop))
            for p in prompts]


def test_greedy_matches_generate_row_by_row_with_rows_ending_at_different_steps(loaded):
    model, tokenizer = loaded
    free = reference(model, tokenizer, PROMPTS, 12)
    assert len({tuple(t) for t in free}) == len(PROMPTS), "the test model must continue each prompt differently"
    # an EOS token the rows reach at different steps (or never): the 4th token of prompt 1's continuation
    eos = free[1][3]
    expected = reference(model, tokenizer, PROMPTS, 12, eos=eos)
    ends = sorted(len(t) for t in expected)
    assert ends[0] < ends[-1], "rows must end at different steps"
    for slots in (1, 3, 16):  # 3 slots < 7 prompts: freed slots take the next prompt
        stats = {}
        completions = engine.run(model, tokenizer, requests(tokenizer, PROMPTS, 12), eos_token_ids=[eos],
                                 slots=slots, stats=stats)
        assert [c.token_ids for c in completions] == expected, slots
        assert {c.stopped_by for c in completions} == {"eos", "length"}
        assert stats["slots"] == min(slots, len(PROMPTS))


def test_generate_keeps_its_text_semantics_and_order(loaded):
    model, tokenizer = loaded
    expected = [tokenizer.decode(t, skip_special_tokens=True) for t in reference(model, tokenizer, PROMPTS, 10)]
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2) == expected
    assert generate(model, tokenizer, PROMPTS[:1], max_new_tokens=10, batch_size=8) == expected[:1]


def test_stop_strings_end_a_row_early_and_are_cut(loaded):
    model, tokenizer = loaded
    full = [tokenizer.decode(t, skip_special_tokens=True) for t in reference(model, tokenizer, PROMPTS, 16)]
    marker = full[2][len(full[2]) // 2: len(full[2]) // 2 + 3]  # a piece from the middle of one continuation
    assert marker.strip(), full[2]
    completions = engine.run(model, tokenizer, requests(tokenizer, PROMPTS, 16, stop=[marker]),
                             eos_token_ids=[model.generation_config.eos_token_id], slots=2)
    texts = [cut_at_stop(tokenizer.decode(c.token_ids, skip_special_tokens=True), [marker]) for c in completions]
    assert texts == [cut_at_stop(text, [marker]) for text in full]
    assert completions[2].stopped_by == "stop" and len(completions[2].token_ids) < 16
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=16, stop=[marker]) == texts


def test_shared_prefix_is_encoded_once_and_changes_nothing(loaded):
    model, tokenizer = loaded
    prompts = [format_prompt(tokenizer, [{"role": "user", "content": p}], True) for p in PROMPTS[:4]]
    stats = {}
    completions = engine.run(model, tokenizer, requests(tokenizer, prompts, 8),
                             eos_token_ids=[model.generation_config.eos_token_id], slots=2, stats=stats)
    assert stats["shared_prefix_tokens"] > 10  # the chat template's system turn and "<|im_start|>user\n"
    assert [c.token_ids for c in completions] == reference(model, tokenizer, prompts, 8)


def test_sampling_is_reproducible_and_independent_of_the_batch(loaded):
    model, tokenizer = loaded
    sampling = engine.Sampling(temperature=1.0, top_k=50, seed=3)

    def sample(prompts, slots, seed=3):
        found = engine.run(model, tokenizer, requests(tokenizer, prompts, 10), eos_token_ids=[],
                           sampling=engine.Sampling(temperature=1.0, top_k=50, seed=seed), slots=slots)
        return [c.token_ids for c in found]

    first = sample(PROMPTS, 3)
    assert sample(PROMPTS, 3) == first
    assert sample(PROMPTS, 1) == first  # the slot count does not change a prompt's sample
    assert sample(PROMPTS[:3], 2) == first[:3]  # nor do the other prompts
    assert sample(PROMPTS, 3, seed=4) != first
    greedy = reference(model, tokenizer, PROMPTS, 10)
    assert first != greedy
    assert sampling.top_p is None
    # top_k=None is what model.generate makes of it: the model's generation_config, else transformers' default 50
    assert sampling_settings(model, temperature=0.7).top_k == 50
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.7, seed=5)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.7, seed=5,
                    batch_size=1) == texts


def test_generate_until_matches_lm_eval_hflm(varied_tiny_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(varied_tiny_model), device="cpu", batch_size=3, dtype="float32", max_length=40)
    greedy = {"until": ["\n\n", "Question:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 12}
    short = {"until": "the", "max_gen_toks": 6}
    long_context = " ".join(["word"] * 60)  # longer than max_length - max_gen_toks: left-truncated
    arguments = [(PROMPTS[0], greedy), (PROMPTS[1], short), (PROMPTS[3], greedy), (long_context, greedy),
                 (PROMPTS[5], short), (PROMPTS[6], greedy), (PROMPTS[2], greedy)]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=args, idx=0) for args in arguments]
    ours = generate_until(lm, reqs, disable_tqdm=True)
    theirs = lm.generate_until(reqs, disable_tqdm=True)
    assert ours == theirs
    assert len(set(ours)) > 3, ours  # the texts differ: the comparison is not vacuous


def test_generate_until_refuses_kwargs_it_does_not_implement(varied_tiny_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(varied_tiny_model), device="cpu", batch_size=1, dtype="float32")
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=("Hello", {"until": ["\n"], "repetition_penalty": 1.3}))]
    with pytest.raises(HarnessError, match="repetition_penalty"):
        generate_until(lm, reqs, disable_tqdm=True)


def test_thread_policy_uses_the_cores_others_leave_free(monkeypatch):
    original = torch.get_num_threads()
    policy = engine.ThreadPolicy(1)
    assert policy.apply() == 1 and torch.get_num_threads() == 1
    policy.restore()
    assert torch.get_num_threads() == original
    # another process kept a whole core busy for the last second on a 2-core machine: one thread
    assert engine.other_load((0.0, 100.0, 5.0), (1.0, 101.6, 5.6)) == pytest.approx(1.0)
    monkeypatch.setattr(engine, "cpu_sample", iter([(0.0, 100.0, 5.0), (1.0, 101.1, 5.0)]).__next__)
    monkeypatch.setattr(engine, "THREAD_PROBE_SECONDS", 0.0)
    busy = engine.ThreadPolicy(None)
    busy.cores, busy.original = 2, 2
    assert busy.apply(force=True) == 1 and busy.history == [(1.1, 1)]
    busy.restore()
    monkeypatch.setattr(engine, "cpu_sample", iter([(0.0, 100.0, 5.0), (1.0, 100.2, 5.0)]).__next__)
    idle = engine.ThreadPolicy(None)
    idle.cores, idle.original = 2, 2
    assert idle.apply(force=True) == 2
    idle.restore()
    with pytest.raises(HarnessError, match="threads=0"):
        engine.ThreadPolicy(0)


def test_bad_requests_are_one_line_errors(loaded):
    model, tokenizer = loaded
    with pytest.raises(HarnessError, match="empty prompt"):
        engine.run(model, tokenizer, [engine.Request([], 4)], eos_token_ids=[])
    assert engine.run(model, tokenizer, [engine.Request([5, 6], 0)], eos_token_ids=[])[0].token_ids == []


@pytest.mark.slow
def test_embedded_model_greedy_matches_generate(cache_dir):
    from harness.inputs.models import materialize_embedded

    model, tokenizer = load_for_generation(materialize_embedded("smollm2-135m-instruct", cache_dir))
    prompts = [format_prompt(tokenizer, [{"role": "user", "content": text}], True)
               for text in ("What is the capital of France?", "Write a haiku about autumn.",
                            "Give me three tips for staying focused.", "What is 12 times 7?")]
    eos = model.generation_config.eos_token_id
    expected = reference(model, tokenizer, prompts, 48, eos=eos)
    completions = engine.run(model, tokenizer, requests(tokenizer, prompts, 48), eos_token_ids=[eos], slots=3)
    assert [c.token_ids for c in completions] == expected
    assert any(c.stopped_by == "eos" for c in completions)
