"""Completion log-probs and held-out preference accuracy: exactness, batch-size invariance, hand values."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.evaluate.logprobs import pair_logps, preference_accuracy, render

PAIRS = [{"prompt": [{"role": "user", "content": f"Question {i}: say something {'nice' * (i % 3 + 1)}."}],
          "chosen": "Certainly, happy to help." + " Yes." * i, "rejected": "No."} for i in range(10)]


def test_logps_match_a_direct_computation_and_do_not_depend_on_batch_size(tiny_model):
    one = pair_logps(tiny_model, PAIRS, batch_size=1)
    eight = pair_logps(tiny_model, PAIRS, batch_size=8)
    for a, b in zip(one, eight):
        assert a["chosen_tokens"] == b["chosen_tokens"] and a["rejected_tokens"] == b["rejected_tokens"]
        assert a["chosen_logp"] == pytest.approx(b["chosen_logp"], abs=1e-4)
        assert a["rejected_logp"] == pytest.approx(b["rejected_logp"], abs=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt, completion = render(tokenizer, PAIRS[3]["prompt"], PAIRS[3]["chosen"])
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    direct = sum(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[token].item() for k, token in enumerate(completion))
    assert one[3]["chosen_logp"] == pytest.approx(direct, abs=1e-4)


def test_preference_accuracy_by_hand():
    policy = [{"chosen_logp": -2.0, "chosen_tokens": 2, "rejected_logp": -3.0, "rejected_tokens": 1},   # avg: −1 vs −3
              {"chosen_logp": -6.0, "chosen_tokens": 2, "rejected_logp": -2.0, "rejected_tokens": 1}]   # avg: −3 vs −2
    reference = [{"chosen_logp": -2.5, "chosen_tokens": 2, "rejected_logp": -2.5, "rejected_tokens": 1},  # ratio +0.5 vs −0.5
                 {"chosen_logp": -6.0, "chosen_tokens": 2, "rejected_logp": -2.0, "rejected_tokens": 1}]  # ratio 0 vs 0: tie
    scores = preference_accuracy(policy, reference)
    assert scores["avg_logp"][:2] == (0.5, pytest.approx(0.5))        # outcomes (1, 0): mean ½, stderr √(½/2)=½
    assert scores["logratio"][2] == [1.0, 0.5] and scores["logratio"][0] == 0.75
    assert "logratio" not in preference_accuracy(policy, None)
