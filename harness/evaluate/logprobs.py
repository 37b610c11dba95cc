"""Summed completion log-probabilities of preference pairs, and held-out preference accuracy.

Sequences are rendered the way TRL renders conversational data: the prompt through the chat
template with the generation prompt, the completion as the assistant turn that follows; only
completion tokens are scored. Checkpoints without a chat template (pretrained bases) get the
plain ``\\n\\nHuman: ... \\n\\nAssistant: ...`` format of the HH data.

``cached_pair_logps`` / ``cached_example_logps`` keep a checkpoint's scores on disk by content (the model's weight
files and the rows), so the held-out task, tuning selection and every method of a setting share them; each is a
checked file (``harness.inputs.cache``): a damaged one is scored again.
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.identity import config_hash
from harness.inputs.cache import build_once, read_checked_json, write_checked_json


PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render(tokenizer, prompt: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, completion) as a chat model sees them."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    else:
        prompt_text = "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in prompt) + "\n\nAssistant:"
        full_text = prompt_text + " " + completion + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
        shared += 1
    return full_ids[:shared], full_ids[shared:]


def completion_logps(model, tokenizer, sequences: list[tuple[list[int], list[int]]], *, batch_size: int = 8,
                     device: str = "cpu") -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each completion given its prompt, scored by the prefix-sharing engine
    (``harness.evaluate.loglik``): a prompt shared by a chosen and a rejected completion, and the chat template's
    opening shared by all, are encoded once. The first token of a completion without a prompt is not scored
    (nothing predicts it). Batch size does not change results beyond float rounding. The model runs on its own
    device (``device`` is where the caller put it); ``tokenizer`` is no longer read (the ids are given)."""
    from harness.evaluate.loglik import score_continuations

    model.eval()
    requests, position = [], []
    for prompt, completion in sequences:
        if not prompt:
            prompt, completion = completion[:1], completion[1:]
        position.append(len(requests) if prompt and completion else None)
        if prompt and completion:
            requests.append((prompt, completion))
    scores = score_continuations(model, requests, batch_size=batch_size, progress="log-probs of completions")
    return [(scores[k][0] if k is not None else 0.0, len(completion))
            for k, (_, completion) in zip(position, sequences)]


def pair_logps(path: Path, pairs: list[dict], *, batch_size: int = 8, device: str = "cpu") -> list[dict]:
    """For each pair: chosen/rejected summed log-probs and lengths under the model at ``path``."""
    import torch
    from transformers import AutoModelForCausalLM
    from harness.inputs.tokenizer_cache import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    sequences = []
    for pair in pairs:
        sequences.append(render(tokenizer, pair["prompt"], pair["chosen"]))
        sequences.append(render(tokenizer, pair["prompt"], pair["rejected"]))
    scored = completion_logps(model, tokenizer, sequences, batch_size=batch_size, device=device)
    return [{"chosen_logp": scored[2 * i][0], "chosen_tokens": scored[2 * i][1],
             "rejected_logp": scored[2 * i + 1][0], "rejected_tokens": scored[2 * i + 1][1]} for i in range(len(pairs))]


def preference_accuracy(policy: list[dict], reference: list[dict] | None) -> dict:
    """Share of held-out pairs whose implicit reward ranks chosen above rejected (ties count half).

    * ``logratio`` (reference-based methods, DPO eq. 5): r = log π(y|x) − log π_ref(y|x);
    * ``avg_logp`` (reference-free methods, SimPO eq. 4): r = log π(y|x) / |y|.

    Returns ``{name: (value, standard error, per-pair outcomes)}``.
    """
    def score(outcomes: list[float]) -> tuple[float, float, list[float]]:
        n = len(outcomes)
        mean = sum(outcomes) / n
        variance = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
        return mean, math.sqrt(variance / n), outcomes

    def compare(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    results = {"avg_logp": score([compare(p["chosen_logp"] / max(p["chosen_tokens"], 1),
                                          p["rejected_logp"] / max(p["rejected_tokens"], 1)) for p in policy])}
    if reference is not None:
        results["logratio"] = score([compare(p["chosen_logp"] - r["chosen_logp"], p["rejected_logp"] - r["rejected_logp"])
                                     for p, r in zip(policy, reference)])
    return results


def _model_identity(path: Path) -> dict:
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {"path": str(path.resolve()), "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


def cached_pair_logps(path: Path, pairs: list[dict], cache_dir: Path, *, batch_size: int, device: str) -> list[dict]:
    key = config_hash({"model": _model_identity(path), "pairs": pairs})
    cache_file = cache_dir / "pair_logps" / f"{key}.json"

    def build() -> list[dict]:
        scored = pair_logps(path, pairs, batch_size=batch_size, device=device)
        write_checked_json(cache_file, scored)
        return scored

    return build_once(cache_file, "pair log-probs", lambda: read_checked_json(cache_file, "pair log-probs"), build)


def cached_example_logps(path: Path, examples: list[dict], cache_dir: Path, *, batch_size: int,
                         device: str) -> list[dict]:
    """Summed completion log-prob and length of each binary-feedback example under the model at ``path`` (cached)."""
    key = config_hash({"model": _model_identity(path), "examples": examples})
    cache_file = cache_dir / "example_logps" / f"{key}.json"

    def build() -> list[dict]:
        import torch
        from transformers import AutoModelForCausalLM
        from harness.inputs.tokenizer_cache import load_tokenizer

        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        sequences = [render(tokenizer, example["prompt"], example["completion"]) for example in examples]
        scored = [{"logp": logp, "tokens": tokens}
                  for logp, tokens in completion_logps(model, tokenizer, sequences, batch_size=batch_size, device=device)]
        write_checked_json(cache_file, scored)
        return scored

    return build_once(cache_file, "example log-probs", lambda: read_checked_json(cache_file, "example log-probs"),
                      build)
