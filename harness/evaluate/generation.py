"""Greedy (or sampled) generation for the tasks that score model outputs (toxicity, win rate, ...).

Batch-size invariance: prompts are left-padded and each row is generated with its own attention
mask; with greedy decoding in fp32 the same checkpoint gives the same text at batch size 1 and 8
(tests check this per task). Prompts are sorted by length before batching to waste less padding,
and results are returned in the input order.
"""

from __future__ import annotations

from pathlib import Path

from harness.evaluate.logprobs import PLAIN_ROLES


def format_prompt(tokenizer, messages: list[dict], use_chat_template: bool) -> str:
    """Chat template for instruct / SFT checkpoints; plain ``Human: / Assistant:`` text for base models."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def load_for_generation(path: Path, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             device: str = "cpu", stop: list[str] | None = None, progress: str | None = None) -> list[str]:
    """Continuations of ``prompts`` (text after the prompt, cut at the first ``stop`` string). Sampling draws from the
    softmax at ``temperature``, restricted to the ``top_k`` likeliest tokens when set (None: the whole vocabulary;
    the model's own generation_config defaults are overridden either way)."""
    import torch
    from tqdm.auto import tqdm

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
                                       top_k=top_k if do_sample else None,
                                       pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        for row, index in enumerate(batch):
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            for marker in stop or []:
                text = text.split(marker)[0]
            outputs[index] = text
    return outputs
