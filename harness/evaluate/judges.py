"""Pairwise judges: which of two outputs to an instruction is better, as a probability.

A judge is anything with ``judge(instruction, output_1, output_2) -> Judgment`` (and the batched
``judge_batch``). A ``Judgment`` carries the probability that ``output_1`` is the better output and
how it was obtained. Every judge asks in **both presentation orders** and averages them, which cancels
a judge's position bias (RLAIF, Lee et al. 2023, arXiv:2309.00267; AlpacaEval randomizes the order instead):

    p = (p("1" | output_1, output_2) + (1 − p("1" | output_2, output_1))) / 2

Judges (``judge.type`` in ``conf/task/win_rate.yaml``; ``judge.model`` names the model for all three):

* ``local_hf`` — a local Hugging Face causal LM (default: the embedded SmolLM2-135M-Instruct). The
  judging prompt (``JUDGE_PROMPT``) goes through the model's chat template, the assistant turn is
  opened with ``Preferred Response=`` and the next-token logits of the label tokens ``1`` and ``2``
  give p("1") = softmax over just those two logits (RLAIF's "Preferred Summary=" scoring).
* ``openai_api`` — any OpenAI-compatible ``/chat/completions`` endpoint (``judge.base_url``,
  ``judge.model``; the key is read from the environment variable ``judge.api_key_env``). The same
  prompt is sent at temperature 0; p("1") comes from the returned top log-probs of ``1`` / ``2``
  when the server gives them, otherwise from the reply text parsed for ``1`` / ``2`` / ``tie``
  (``parse_verdict``; an unparseable reply counts as 0.5 and is recorded as such).
* ``reward_model`` — a sequence-classification reward model with one output: each output is scored
  alone as the assistant reply to the instruction, r₁ and r₂, and p = σ(r₁ − r₂) (Bradley–Terry);
  the order cannot matter, so both orders agree by construction.
* ``likelihood`` — each output scored alone under a causal LM (``judge.model``) as the answer to the instruction:
  per-token log-likelihood, per-token pointwise mutual information with the instruction and log length, combined
  with fixed weights (``judge.weights``) into p = σ(w · Δfeatures); order-free like the reward model (``LikelihoodJudge``).

Also here: AlpacaEval's aggregation of pairwise preferences into a win rate with its standard error
(``win_rate_from_preferences``; preferences without a verdict, None/NaN, are dropped and counted as AlpacaEval
drops them) and the judge check against the GPT-4 annotations in the data mirror (``read_gpt4_annotations``,
``judge_agreement``, which skips pairs GPT-4 gave no verdict; ``align-harness judge-check``), and that check kept in the
harness cache for the win-rate records (``cached_judge_check``: agreement, the better of the length and constant
baselines on the same pairs, ``below_baseline``; the leaderboard marks and, below baseline, leaves out such a column).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from harness.errors import HarnessError

JUDGE_TYPES = ("local_hf", "openai_api", "reward_model", "likelihood")
DEFAULT_JUDGE_MODEL = "embedded:smollm2-135m-instruct"
LABELS = ("1", "2")

# The judging prompt, shared by the local and the API judge. Kept short: a 135M judge reads it on CPU.
JUDGE_PROMPT = (
    "You are comparing two responses to the same instruction. Choose the response that follows the "
    "instruction better: more helpful, accurate and relevant.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Response 1:\n{output_1}\n\n"
    "Response 2:\n{output_2}\n\n"
    "Which response is better? Answer with a single number: 1 or 2."
)
LOCAL_ANSWER_PREFIX = "Preferred Response="  # opens the assistant turn; the next token is read (RLAIF)


# ---------------------------------------------------------------------------------------------
# the protocol
@dataclass
class Judgment:
    """A judge's answer for one (instruction, output_1, output_2)."""

    probability: float           # P(output_1 is better), both orders averaged
    output_1_first: float        # P(output_1 is better) with output_1 shown as "Response 1"
    output_1_second: float       # P(output_1 is better) with output_1 shown as "Response 2" (= 1 − p("1" | 2, 1))
    method: str                  # label_logits | logprobs | text | reward_difference (per order, joined by "+")
    raw: dict = field(default_factory=dict)  # what the judge said in each order (logits, reply texts, rewards)

    def preference(self, draw_margin: float) -> str:
        """AlpacaEval coding: "1" output_1 better, "2" output_2 better, "0" a draw (|p − 0.5| ≤ draw_margin)."""
        return preference_label(self.probability, draw_margin)

    def consistent(self, draw_margin: float) -> bool:
        """Both presentation orders name the same winner (or both a draw)."""
        return preference_label(self.output_1_first, draw_margin) == preference_label(self.output_1_second, draw_margin)


@runtime_checkable
class Judge(Protocol):
    type: str

    def identity(self) -> dict: ...   # what the judge is, for records and cache keys

    def judge(self, instruction: str, output_1: str, output_2: str) -> Judgment: ...

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgment]: ...


def preference_label(probability: float, draw_margin: float) -> str:
    if probability > 0.5 + draw_margin:
        return "1"
    if probability < 0.5 - draw_margin:
        return "2"
    return "0"


def judging_prompt(instruction: str, output_1: str, output_2: str, max_output_chars: int | None) -> str:
    def cut(text: str) -> str:
        return text if max_output_chars is None or len(text) <= max_output_chars else text[:max_output_chars]

    return JUDGE_PROMPT.format(instruction=instruction, output_1=cut(output_1), output_2=cut(output_2))


def both_orders(items: list[tuple[str, str, str]], one_order) -> list[Judgment]:
    """Ask ``one_order`` (a batch of (instruction, first, second) -> [(p("1"), method, raw)]) in both orders."""
    asked = [(i, a, b) for i, a, b in items] + [(i, b, a) for i, a, b in items]
    answers = one_order(asked)
    n = len(items)
    judgments = []
    for k in range(n):
        (p_forward, method_forward, raw_forward), (p_backward, method_backward, raw_backward) = answers[k], answers[n + k]
        first, second = p_forward, 1.0 - p_backward
        method = method_forward if method_forward == method_backward else f"{method_forward}+{method_backward}"
        judgments.append(Judgment(probability=(first + second) / 2, output_1_first=first, output_1_second=second,
                                  method=method, raw={"output_1_first": raw_forward, "output_1_second": raw_backward}))
    return judgments


# ---------------------------------------------------------------------------------------------
# building a judge from config
JUDGE_KEYS = {
    # type -> the config keys it reads (besides ``type``); everything else is an error
    "local_hf": {"model", "max_output_chars"},
    "openai_api": {"model", "max_output_chars", "base_url", "api_key_env", "timeout_seconds", "max_retries",
                   "max_tokens", "use_logprobs"},
    "reward_model": {"model", "max_output_chars"},
    "likelihood": {"model", "max_output_chars", "weights"},
}


def build_judge(config: dict, *, device: str = "cpu", batch_size: int = 8, config_key: str = "judge",
                cache_dir: Path | None = None) -> "Judge":
    """The judge ``config`` describes (``{"type": ..., "model": ..., ...}``). Checks the config, loads nothing:
    models are loaded on the first judgment, resolved into ``cache_dir`` (the sweep's ``paths.cache``; default
    ``harness.inputs.paths.default_cache_dir()``)."""
    config = dict(config or {})
    kind = config.pop("type", "local_hf")
    if kind not in JUDGE_TYPES:
        raise HarnessError(f"unknown judge type {kind!r} ({config_key}.type); available: {', '.join(JUDGE_TYPES)}")
    unknown = sorted(set(config) - JUDGE_KEYS[kind])
    if unknown:
        raise HarnessError(f"{config_key}.{unknown[0]} is not a setting of the {kind} judge; "
                           f"it reads: {', '.join(sorted(JUDGE_KEYS[kind]))}")
    max_chars = config.get("max_output_chars")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise HarnessError(f"{config_key}.max_output_chars={max_chars!r} must be a positive number of characters or null")
    if kind == "local_hf":
        return LocalHFJudge(config.get("model", DEFAULT_JUDGE_MODEL), max_output_chars=max_chars, device=device,
                            batch_size=batch_size, config_key=config_key, cache_dir=cache_dir)
    if kind == "reward_model":
        if not config.get("model") or config["model"] == DEFAULT_JUDGE_MODEL:
            raise HarnessError(f"the reward_model judge needs a reward model: set {config_key}.model=<folder of a "
                               f"sequence-classification checkpoint>")
        return RewardModelJudge(config["model"], max_output_chars=max_chars, device=device, batch_size=batch_size,
                                config_key=config_key, cache_dir=cache_dir)
    if kind == "likelihood":
        return LikelihoodJudge(config.get("model", DEFAULT_JUDGE_MODEL), weights=config.get("weights"),
                               max_output_chars=max_chars, device=device, batch_size=batch_size,
                               config_key=config_key, cache_dir=cache_dir)
    return OpenAIAPIJudge(**config, config_key=config_key)


def checked_judge_config(config, config_key: str) -> dict | None:
    """A method's optional ``judge:`` setting, checked now (nothing loaded), as a plain dict; None when unset."""
    if not config:
        return None
    build_judge(config, config_key=config_key)
    return dict(config)


def _resolve_model(spec: str, config_key: str, cache_dir: Path | None = None) -> Path:
    from harness.inputs.models import resolve_checkpoint
    from harness.inputs.paths import default_cache_dir

    # The judge's model lives in the harness cache's models/ folder, like every starting checkpoint.
    return resolve_checkpoint(spec, cache_dir=cache_dir or default_cache_dir(), config_key=f"{config_key}.model")


def _is_local_spec(spec: str) -> bool:
    return spec.startswith(("embedded:", "tiny-random:", "/", ".", "~")) or Path(spec).expanduser().exists()


def _check_local_spec(spec: str, config_key: str) -> None:
    """A path-like ``spec`` must be a model folder now (hub ids and embedded models resolve on first use)."""
    if not isinstance(spec, str) or not spec:
        raise HarnessError(f"{config_key}.model={spec!r}: name a model (embedded:<name>, a local folder or a hub id)")
    path = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) and not (path / "config.json").exists():
        raise HarnessError(f"{config_key}.model={spec}: no model folder there (no config.json); "
                           f"set {config_key}.model=<local HF model folder>")


# ---------------------------------------------------------------------------------------------
# (a) a local causal LM reading the label logits
class LocalHFJudge:
    type = "local_hf"

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, *, max_output_chars: int | None = None, device: str = "cpu",
                 batch_size: int = 8, config_key: str = "judge", cache_dir: Path | None = None):
        _check_local_spec(model, config_key)
        self.cache_dir = cache_dir
        self.spec, self.max_output_chars, self.device, self.batch_size = model, max_output_chars, device, batch_size
        self.config_key = config_key
        self._loaded = None

    def identity(self) -> dict:
        return {"type": self.type, "model": self.spec, "max_output_chars": self.max_output_chars,
                "prompt": JUDGE_PROMPT, "answer_prefix": LOCAL_ANSWER_PREFIX}

    def load(self):
        if self._loaded is None:
            import torch
            from transformers import AutoModelForCausalLM
            from harness.inputs.tokenizer_cache import load_tokenizer

            path = _resolve_model(self.spec, self.config_key, self.cache_dir)
            tokenizer = load_tokenizer(path)
            label_ids = []
            for label in LABELS:
                ids = tokenizer.encode(label, add_special_tokens=False)
                if len(ids) != 1:
                    raise HarnessError(f"{self.config_key}.model={self.spec}: the label {label!r} is {len(ids)} tokens in "
                                       f"its tokenizer; the local_hf judge reads single-token labels")
                label_ids.append(ids[0])
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
            self._loaded = (model, tokenizer, label_ids)
        return self._loaded

    def judge(self, instruction: str, output_1: str, output_2: str) -> Judgment:
        return self.judge_batch([(instruction, output_1, output_2)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgment]:
        return both_orders(items, self._one_order)

    def _one_order(self, items: list[tuple[str, str, str]]) -> list[tuple[float, str, dict]]:
        """p("1") per item from the two label logits at the answer position: the softmax over the two logits equals
        the softmax over the log-probs of the one-token continuations "1" and "2", which the prefix-sharing engine
        (``harness.evaluate.loglik``) scores with the judging instructions encoded once. Recorded per item: both
        log-probs, their total probability (``label_mass``) and the prompt's length in tokens."""
        from harness.evaluate.generation import format_prompt
        from harness.evaluate.loglik import score_continuations

        model, tokenizer, (id_1, id_2) = self.load()
        texts = [format_prompt(tokenizer, [{"role": "user", "content": judging_prompt(i, a, b, self.max_output_chars)}],
                               use_chat_template=True) + LOCAL_ANSWER_PREFIX for i, a, b in items]
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        scores = score_continuations(model, [(ids, [label]) for ids in encoded for label in (id_1, id_2)],
                                     batch_size=self.batch_size, progress="judging")
        out: list[tuple[float, str, dict]] = []
        for k, ids in enumerate(encoded):
            logp_1, logp_2 = scores[2 * k][0], scores[2 * k + 1][0]
            out.append((_two_way_softmax(logp_1, logp_2), "label_logits",
                        {"logp_1": logp_1, "logp_2": logp_2, "label_mass": math.exp(logp_1) + math.exp(logp_2),
                         "prompt_tokens": len(ids)}))
        return out


def _two_way_softmax(first: float, second: float) -> float:
    """exp(first) / (exp(first) + exp(second)), without overflow."""
    difference = second - first
    if difference > 0:
        return math.exp(-difference) / (1.0 + math.exp(-difference))
    return 1.0 / (1.0 + math.exp(difference))


# ---------------------------------------------------------------------------------------------
# (b) an OpenAI-compatible chat-completions API
class OpenAIAPIJudge:
    type = "openai_api"

    def __init__(self, model: str | None = None, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", max_output_chars: int | None = None,
                 timeout_seconds: float = 60.0, max_retries: int = 3, max_tokens: int = 16, use_logprobs: bool = True,
                 config_key: str = "judge"):
        if not model or not isinstance(model, str) or model.startswith(("embedded:", "tiny-random:")):
            raise HarnessError(f"{config_key}.model={model!r} is not a model name an API serves; "
                               f"set {config_key}.model=<the served model name, e.g. gpt-4o-mini>")
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise HarnessError(f"{config_key}.base_url={base_url!r} must be an http(s) URL ending before "
                               f"/chat/completions, e.g. https://api.openai.com/v1")
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise HarnessError(f"the openai_api judge reads its key from the environment variable {api_key_env}, "
                                   f"which is not set; export {api_key_env}=<key> or set {config_key}.api_key_env="
                                   f"<variable name> (null sends no key)")
        self.model, self.base_url, self.api_key_env = model, str(base_url).rstrip("/"), api_key_env
        self.max_output_chars, self.timeout_seconds, self.max_retries = max_output_chars, float(timeout_seconds), int(max_retries)
        self.max_tokens, self.use_logprobs = int(max_tokens), bool(use_logprobs)
        self.logprobs_refused = False  # set when the server rejected the logprobs parameter once

    def identity(self) -> dict:
        return {"type": self.type, "model": self.model, "base_url": self.base_url, "max_output_chars": self.max_output_chars,
                "max_tokens": self.max_tokens, "use_logprobs": self.use_logprobs, "prompt": JUDGE_PROMPT}

    def judge(self, instruction: str, output_1: str, output_2: str) -> Judgment:
        return self.judge_batch([(instruction, output_1, output_2)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgment]:
        return both_orders(items, lambda asked: [self._ask(*item) for item in asked])

    def _ask(self, instruction: str, first: str, second: str) -> tuple[float, str, dict]:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": judging_prompt(instruction, first, second, self.max_output_chars)}]}
        if self.use_logprobs and not self.logprobs_refused:
            body.update(logprobs=True, top_logprobs=5)
        reply = self._post(body)
        try:
            choice = reply["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"{self.base_url}/chat/completions returned no choices[0].message: {str(reply)[:200]}") from None
        from_logprobs = label_probability_from_logprobs(choice.get("logprobs"))
        if from_logprobs is not None:
            return from_logprobs, "logprobs", {"text": text}
        parsed = parse_verdict(text)
        return (0.5 if parsed is None else parsed), "text", {"text": text, "parsed": parsed is not None}

    def _post(self, body: dict) -> dict:
        """POST with retries on connection errors, 429 and 5xx (exponential backoff from 1 s)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300]
                if error.code == 400 and "logprobs" in body and not self.logprobs_refused:
                    self.logprobs_refused = True  # some servers reject the parameter: parse the text instead
                    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
                    continue
                if error.code in (401, 403):
                    raise HarnessError(f"{url} refused the key from {self.api_key_env} (HTTP {error.code}): {detail}") from None
                if error.code != 429 and error.code < 500 or attempt == self.max_retries:
                    raise RuntimeError(f"{url}: HTTP {error.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.max_retries:
                    raise RuntimeError(f"{url} unreachable after {attempt + 1} attempts: {error}") from None
            time.sleep(min(2 ** attempt, 30))
        raise RuntimeError(f"{url}: no answer")  # unreachable: the loop returns or raises


def label_probability_from_logprobs(logprobs: dict | None) -> float | None:
    """p("1") / (p("1") + p("2")) at the first generated position whose top log-probs hold either label;
    None when the server sent none. Tokens are compared stripped of spaces and markup (``" 1"``, ``"**1"``)."""
    content = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    for position in content:
        candidates = list(position.get("top_logprobs") or []) or [position]
        mass = {label: 0.0 for label in LABELS}
        for candidate in candidates:
            token = str(candidate.get("token", "")).strip().strip("*\"'()[]`.:")
            if token in mass and candidate.get("logprob") is not None:
                mass[token] += math.exp(float(candidate["logprob"]))
        if mass["1"] + mass["2"] > 0:
            return mass["1"] / (mass["1"] + mass["2"])
    return None


_TIE = re.compile(r"\b(tie|tied|draw|equally (good|bad|helpful)|both (are )?equal)\b")
_NAMED = re.compile(r"\b(?:response|output|answer|assistant)\s*[#(\[]?\s*([12])\b")
_LEADING = re.compile(r"[\s*_`\"'(\[#]*([12])(?![\w,])")
_DIGIT = re.compile(r"(?<![\w.])([12])(?![\w])")


def parse_verdict(text: str) -> float | None:
    """P(response 1 is better) from a judge's reply: 1.0 / 0.0 for a clear "1" / "2", 0.5 for a tie,
    None when the reply names no verdict or both labels without saying which.

    In order: the whole reply is just the label (``"2"``, ``"**1**"``, ``"Response 2."``); a tie word;
    a reply that starts with a label (``"1. Paris ..."``: asked for a single number, the judge answered
    first); the first label named as "Response N" / "Output N"; a single bare label digit anywhere.
    """
    lowered = (text or "").strip().lower()
    bare = re.sub(r"[\s*_`\"'().:\[\]#]|response|output", "", lowered)
    if bare in LABELS:
        return 1.0 if bare == "1" else 0.0
    if _TIE.search(lowered):
        return 0.5
    leading = _LEADING.match(lowered)
    if leading:
        return 1.0 if leading.group(1) == "1" else 0.0
    named = _NAMED.search(lowered)
    if named:
        return 1.0 if named.group(1) == "1" else 0.0
    digits = set(_DIGIT.findall(lowered))
    if len(digits) == 1:
        return 1.0 if digits.pop() == "1" else 0.0
    return None


# ---------------------------------------------------------------------------------------------
# (c) a sequence-classification reward model
class RewardModelJudge:
    type = "reward_model"

    def __init__(self, model: str, *, max_output_chars: int | None = None, device: str = "cpu", batch_size: int = 8,
                 config_key: str = "judge", cache_dir: Path | None = None):
        _check_local_spec(model, config_key)
        self.spec, self.max_output_chars, self.device, self.batch_size = model, max_output_chars, device, batch_size
        self.config_key, self.cache_dir = config_key, cache_dir
        self._loaded = None

    def identity(self) -> dict:
        return {"type": self.type, "model": self.spec, "max_output_chars": self.max_output_chars}

    def load(self):
        if self._loaded is None:
            import torch
            from transformers import AutoConfig, AutoModelForSequenceClassification
            from harness.inputs.tokenizer_cache import load_tokenizer

            path = _resolve_model(self.spec, self.config_key, self.cache_dir)
            config = AutoConfig.from_pretrained(path)
            architectures = config.architectures or []
            if not any(name.endswith("ForSequenceClassification") for name in architectures) or config.num_labels != 1:
                raise HarnessError(f"{self.config_key}.model={self.spec} is not a reward model (architectures "
                                   f"{architectures}, {config.num_labels} labels); the reward_model judge needs a "
                                   f"*ForSequenceClassification checkpoint with one output")
            tokenizer = load_tokenizer(path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            self._loaded = (model, tokenizer)
        return self._loaded

    def judge(self, instruction: str, output_1: str, output_2: str) -> Judgment:
        return self.judge_batch([(instruction, output_1, output_2)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgment]:
        texts = [self._conversation(i, o) for i, a, b in items for o in (a, b)]
        rewards, lengths = self._rewards(texts)
        judgments = []
        for k in range(len(items)):
            r_1, r_2 = rewards[2 * k], rewards[2 * k + 1]
            p = 1.0 / (1.0 + math.exp(-(r_1 - r_2)))
            read = {"prompt_tokens": lengths[2 * k] + lengths[2 * k + 1]}  # what judged_prompt_tokens counts
            judgments.append(Judgment(probability=p, output_1_first=p, output_1_second=p, method="reward_difference",
                                      raw={"reward_1": r_1, "reward_2": r_2, "read": read}))
        return judgments

    def _conversation(self, instruction: str, output: str) -> str:
        _, tokenizer = self.load()
        if self.max_output_chars is not None:
            output = output[: self.max_output_chars]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                                  {"role": "assistant", "content": output}], tokenize=False)
        return f"\n\nHuman: {instruction}\n\nAssistant: {output}"

    def _rewards(self, texts: list[str]) -> tuple[list[float], list[int]]:
        """The reward of each text, and the tokens it read (the FLOPs accounting of methods that judge)."""
        import torch

        model, tokenizer = self.load()
        limit = min(getattr(tokenizer, "model_max_length", 4096) or 4096, 4096)
        rewards: list[float] = []
        lengths: list[int] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = tokenizer(texts[start: start + self.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=limit,
                                add_special_tokens=not getattr(tokenizer, "chat_template", None))  # a template has its own
            with torch.no_grad():
                logits = model(**{k: v.to(self.device) for k, v in encoded.items()}).logits
            rewards += [float(value) for value in logits[:, 0].float().tolist()]
            lengths += [int(n) for n in encoded["attention_mask"].sum(dim=1).tolist()]
        return rewards, lengths


# ---------------------------------------------------------------------------------------------
# (d) each output's likelihood under a causal LM, as a Bradley–Terry judge over a few features
LIKELIHOOD_FEATURES = ("mean_logprob", "mean_pmi", "log_chars")
# Fitted by bench/fit_likelihood_judge.py --evaluate 128 --fit 16 (logistic regression without intercept on feature
# differences) on the GPT-4 annotations of AlpacaEval instructions 64..71 (annotated pairs 128..143), disjoint from the
# 128 pairs (instructions 0..63) its agreement is reported on: 0.711 ± 0.040 vs 0.691 for the longer output (README
# "Win rate and judges": within one standard error of that baseline; 16 pairs are a small fit).
LIKELIHOOD_WEIGHTS = {"mean_logprob": 2.1878, "mean_pmi": -1.4082, "log_chars": 0.6588}


class LikelihoodJudge:
    """Scores each output alone under a causal LM (default the embedded SmolLM2-135M-Instruct), as the assistant turn
    answering the instruction through the model's chat template, closed by its end-of-sequence token, and compares
    per-output features with fixed weights w (Bradley–Terry, like the reward-model judge):

        p(output_1 better) = σ(Σ_k w_k · (f_k(output_1) − f_k(output_2)))

    * ``mean_logprob`` — log p(output | instruction) per token: how fluent and expected the answer is;
    * ``mean_pmi`` — (log p(output | instruction) − log p(output | empty instruction)) per token: how much the
      instruction explains the output (pointwise mutual information; an answer to some other question scores low);
    * ``log_chars`` — log(1 + characters): the length prior GPT-4 judges share (AlpacaEval 2's length control,
      Dubois et al. 2024, arXiv:2404.04475, models the same bias as a term of the judge's log-odds).

    The features of an output do not depend on the other output or on the order, so the judge has no position bias
    and ``p(a, b) = 1 − p(b, a)`` exactly; there is no intercept (no prior for either position). Weights: ``weights``
    (a mapping over ``LIKELIHOOD_FEATURES``; missing features weigh 0), default ``LIKELIHOOD_WEIGHTS``."""

    type = "likelihood"

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, *, weights: dict | None = None,
                 max_output_chars: int | None = None, device: str = "cpu", batch_size: int = 8,
                 config_key: str = "judge", cache_dir: Path | None = None):
        _check_local_spec(model, config_key)
        weights = dict(LIKELIHOOD_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(LIKELIHOOD_FEATURES))
        if unknown:
            raise HarnessError(f"{config_key}.weights.{unknown[0]} is not a feature of the likelihood judge; "
                               f"features: {', '.join(LIKELIHOOD_FEATURES)}")
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HarnessError(f"{config_key}.weights.{name}={value!r} must be a finite number")
        if not any(weights.values()):
            raise HarnessError(f"{config_key}.weights: every weight is 0; the judge would call every pair a draw")
        self.weights = {name: float(weights.get(name, 0.0)) for name in LIKELIHOOD_FEATURES}
        self.spec, self.max_output_chars, self.device, self.batch_size = model, max_output_chars, device, batch_size
        self.config_key, self.cache_dir = config_key, cache_dir
        self._loaded = None
        self.scored: dict[tuple[str, str], dict] = {}  # (instruction, cut output) → its features, kept while loaded

    def identity(self) -> dict:
        return {"type": self.type, "model": self.spec, "max_output_chars": self.max_output_chars,
                "weights": self.weights, "features": "likelihood/1"}

    def load(self):
        if self._loaded is None:
            import torch
            from transformers import AutoModelForCausalLM
            from harness.inputs.tokenizer_cache import load_tokenizer

            path = _resolve_model(self.spec, self.config_key, self.cache_dir)
            tokenizer = load_tokenizer(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
            self._loaded = (model, tokenizer)
        return self._loaded

    def judge(self, instruction: str, output_1: str, output_2: str) -> Judgment:
        return self.judge_batch([(instruction, output_1, output_2)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgment]:
        features = self.features([(i, o) for i, a, b in items for o in (a, b)])
        judgments = []
        for k in range(len(items)):
            first, second = features[2 * k], features[2 * k + 1]
            p = _sigmoid(sum(w * (first[name] - second[name]) for name, w in self.weights.items()))
            judgments.append(Judgment(probability=p, output_1_first=p, output_1_second=p, method="likelihood",
                                      raw={"output_1": first, "output_2": second,
                                           "read": {"prompt_tokens": first["tokens_read"] + second["tokens_read"]}}))
        return judgments

    def features(self, answers: list[tuple[str, str]]) -> list[dict]:
        """``LIKELIHOOD_FEATURES`` (and the token counts) of each (instruction, output); each distinct pair is scored
        once, its two log-likelihoods sharing the chat template's prefix in the engine (``harness.evaluate.loglik``)."""
        distinct = [answer for answer in dict.fromkeys((i, self._cut(o)) for i, o in answers) if answer not in self.scored]
        if distinct:
            self._score(distinct)
        return [self.scored[(i, self._cut(o))] for i, o in answers]

    def _score(self, distinct: list[tuple[str, str]]) -> None:
        from harness.evaluate.generation import format_prompt
        from harness.evaluate.loglik import score_continuations

        model, tokenizer = self.load()
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def context(instruction: str) -> list[int]:
            text = format_prompt(tokenizer, [{"role": "user", "content": instruction}], use_chat_template=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        empty = context("")
        requests, sizes = [], []
        for instruction, output in distinct:
            continuation = tokenizer(output, add_special_tokens=False)["input_ids"] + end
            conditioned = context(instruction)
            requests += [(conditioned, continuation), (empty, continuation)]
            sizes.append((len(continuation), len(conditioned) + len(empty) + 2 * len(continuation)))
        scores = score_continuations(model, requests, batch_size=self.batch_size, progress="judging")
        for k, (answer, (tokens, read)) in enumerate(zip(distinct, sizes)):
            conditional, unconditional = scores[2 * k][0], scores[2 * k + 1][0]
            self.scored[answer] = {"mean_logprob": conditional / tokens, "mean_pmi": (conditional - unconditional) / tokens,
                                   "log_chars": math.log1p(len(answer[1])), "tokens": tokens, "tokens_read": read}

    def _cut(self, output: str) -> str:
        return output if self.max_output_chars is None else output[: self.max_output_chars]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# ---------------------------------------------------------------------------------------------
# aggregation: AlpacaEval's win rate
@dataclass
class WinRate:
    value: float                 # share of items the judged model wins, a draw counting half (0..1)
    stderr: float | None         # standard error of the mean of the per-item scores (ddof = 1)
    wins: int
    losses: int
    draws: int
    scores: list[float]          # per counted item: 1 win, 0 loss, 0.5 draw (or the weighted preference − 1)
    dropped: int = 0             # preferences that were None/NaN (no verdict): left out, as AlpacaEval does


def preference_value(preference, where: str) -> float | None:
    """An AlpacaEval preference as a number in [1, 2] (a draw "0"/0 becomes 1.5); None when there is no verdict
    (None or NaN, which AlpacaEval drops). Anything else is refused, naming ``where``."""
    if preference is None:
        return None
    try:
        value = float(preference)
    except (TypeError, ValueError):
        value = math.inf  # refused below
    if math.isnan(value):
        return None
    if value == 0.0:
        return 1.5
    if not 1.0 <= value <= 2.0:
        raise HarnessError(f"{where}: {preference!r} is not 1, 2, 0 (a draw), a weight in [1, 2] or None (no verdict)")
    return value


def win_rate_from_preferences(preferences) -> WinRate:
    """AlpacaEval's win rate of ``output_2`` (the judged model) over ``output_1`` (the reference).

    A preference is "1"/1 (output_1 better), "2"/2 (output_2 better) or "0"/0 (a draw; AlpacaEval 2 also
    writes 1.5), or a weighted preference in [1, 2]; None or NaN means no verdict. As in AlpacaEval's
    ``describe_head2head`` (``alpaca_eval/metrics/helpers.py``): a draw becomes 1.5, rows without a verdict are
    dropped (counted in ``dropped``), each item scores preference − 1, the win rate is the mean score and the
    standard error is the sample standard deviation (ddof = 1, pandas' ``sem``) over √n. Values outside [1, 2]
    are refused here (AlpacaEval drops them silently). On the mirror's GPT-4 annotations this gives the published
    26.46 ± 1.54 (alpaca-7b) and 41.24 ± 1.73 (alpaca-farm-ppo-human); ddof = 0 would give 1.53 for alpaca-7b.
    """
    scores, dropped = [], 0
    for index, preference in enumerate(preferences):
        value = preference_value(preference, f"preference {index}")
        if value is None:
            dropped += 1
        else:
            scores.append(value - 1.0)
    if not scores:
        raise HarnessError(f"no preferences to aggregate ({dropped} without a verdict)")
    n = len(scores)
    mean = sum(scores) / n
    stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
    return WinRate(value=mean, stderr=stderr, wins=sum(s > 0.5 for s in scores), losses=sum(s < 0.5 for s in scores),
                   draws=sum(s == 0.5 for s in scores), scores=scores, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# the judge check against GPT-4's annotations
ANNOTATIONS_DIR = "alpaca_eval/annotations_gpt4"


def read_gpt4_annotations(data_mirror: Path | None, limit: int | None) -> list[dict]:
    """The first ``limit`` GPT-4-annotated pairs, taking the annotation files (sorted by name: alpaca-7b,
    alpaca-farm-ppo-human) in turn item by item: alpaca-7b #0, ppo-human #0, alpaca-7b #1, ... In every
    file output_1 is text-davinci-003 (the reference) and output_2 the judged model. Rows whose preference is
    None/NaN (GPT-4 gave no verdict) are kept, with ``gpt4`` None; ``judge_agreement`` skips them. Each row gets
    ``gpt4``: its preference as "1", "2" or "0" (a draw)."""
    if data_mirror is None:
        raise HarnessError("the judge check reads the GPT-4 annotations from the data mirror; "
                           "set ALIGN_HARNESS_DATA=<folder> (or --data-mirror)")
    folder = Path(data_mirror) / ANNOTATIONS_DIR
    files = sorted(folder.glob("*.json"))
    if not files:
        raise HarnessError(f"no GPT-4 annotation files in {folder}; point ALIGN_HARNESS_DATA at the data mirror")
    per_file = []
    for path in files:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HarnessError(f"{path}: not valid JSON ({error}); restore it from the AlpacaEval release") from None
        for index, row in enumerate(rows):
            missing = [k for k in ("instruction", "output_1", "output_2", "generator_1", "generator_2", "preference")
                       if not isinstance(row, dict) or k not in row]
            if missing:
                raise HarnessError(f"{path}: row {index}: field {missing[0]!r} is missing")
        per_file.append([{**row, "source": path.name, "index": index,
                          "gpt4": _label_of_annotation(row["preference"], f"{path}: row {index}: preference")}
                         for index, row in enumerate(rows)])
    interleaved = [rows[i] for i in range(max(len(r) for r in per_file)) for rows in per_file if i < len(rows)]
    return interleaved if limit is None else interleaved[:limit]


def _label_of_annotation(preference, where: str = "preference") -> str | None:
    """GPT-4's verdict as "1", "2" or "0" (a draw; a weight rounds to the nearer side, 1.5 is a draw); None when
    there is none (None/NaN)."""
    value = preference_value(preference, where)
    if value is None:
        return None
    return "0" if value == 1.5 else ("1" if value < 1.5 else "2")


def judge_agreement(judge: Judge, annotations: list[dict], *, draw_margin: float) -> dict:
    """How often ``judge`` prefers the same output as GPT-4 on ``annotations`` (AlpacaEval rows).

    Pairs whose GPT-4 preference is None/NaN (no verdict) are not judged and not counted (``unannotated``).
    Per pair: 1 when both name the same winner (or both a draw), 0 when they name opposite winners,
    0.5 when exactly one of them calls a draw. Also the judge's position consistency and the judged
    models' win rate over the reference by the judge and by GPT-4 on the same pairs; two baselines put
    the agreement in context (always preferring the reference; always preferring the longer output).
    """
    labelled = [(row, _label_of_annotation(row["preference"], f"{row.get('source', 'annotation')}: row "
                                            f"{row.get('index', '?')}: preference")) for row in annotations]
    unannotated = sum(label is None for _, label in labelled)
    annotations = [row for row, label in labelled if label is not None]  # no GPT-4 verdict: nothing to agree with
    if not annotations:
        raise HarnessError(f"none of the {unannotated} pairs has a GPT-4 preference; "
                           f"nothing to check the judge against")
    gpt4 = [label for _, label in labelled if label is not None]
    started = time.perf_counter()
    judgments = judge.judge_batch([(row["instruction"], row["output_1"], row["output_2"]) for row in annotations])
    seconds = time.perf_counter() - started
    ours = [j.preference(draw_margin) for j in judgments]

    def agree(a: str, b: str) -> float:
        return 1.0 if a == b else (0.5 if "0" in (a, b) else 0.0)

    def mean_stderr(values: list[float]) -> tuple[float, float | None]:
        n = len(values)
        mean = sum(values) / n
        return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None)

    agreement = [agree(a, b) for a, b in zip(ours, gpt4)]
    consistency = [float(j.consistent(draw_margin)) for j in judgments]
    longer = ["1" if len(r["output_1"]) > len(r["output_2"]) else "2" if len(r["output_2"]) > len(r["output_1"]) else "0"
              for r in annotations]
    return {
        "pairs": len(annotations),
        "unannotated": unannotated,  # pairs skipped: GPT-4's preference is None/NaN
        "agreement": mean_stderr(agreement),
        "position_consistency": mean_stderr(consistency),
        "judge_win_rate": win_rate_from_preferences(ours),
        "gpt4_win_rate": win_rate_from_preferences(gpt4),
        "baseline_always_reference": mean_stderr([agree("1", b) for b in gpt4])[0],
        "baseline_longer_output": mean_stderr([agree(a, b) for a, b in zip(longer, gpt4)])[0],
        "seconds": seconds,
        "judge": judge.identity(),
        "items": [{"source": r["source"], "index": r["index"], "gpt4": g, "judge": o, "probability": j.probability,
                   "output_1_first": j.output_1_first, "output_1_second": j.output_1_second, "method": j.method}
                  for r, g, o, j in zip(annotations, gpt4, ours, judgments)],
    }


# ---------------------------------------------------------------------------------------------
# the judge check that travels with the win-rate records
JUDGE_CHECK_PAIRS = 32        # annotated pairs the win-rate task checks its judge on (judge_check_pairs)
JUDGE_CHECK_FOLDER = "judge_checks"   # under the harness cache: one checked JSON file per (judge, annotations, pairs)
JUDGE_CHECK_VERSION = "1"     # bump when the check's numbers could change for the same judge and annotations
BASELINES = {"longer_output": "baseline_longer_output", "always_reference": "baseline_always_reference"}


def annotations_identity(data_mirror: Path | None) -> dict | None:
    """The GPT-4 annotation files of the mirror by name and SHA-256 (None when there are none): part of a check's key."""
    from harness.inputs.cache import file_sha256

    folder = Path(data_mirror) / ANNOTATIONS_DIR if data_mirror is not None else None
    files = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    return {path.name: file_sha256(path) for path in files} or None


def judge_check_summary(result: dict, annotations: dict | None = None) -> dict:
    """The part of a ``judge_agreement`` result a win-rate record carries: the agreement, the better of the two
    baselines on the same pairs, and whether the judge is below it (then its column is marked on every export and,
    by default, left out of the unified score: ``harness.report.board``)."""
    agreement, stderr = result["agreement"]
    baselines = {name: float(result[key]) for name, key in BASELINES.items()}
    best = max(baselines, key=lambda name: baselines[name])
    return {"status": "checked", "agreement": float(agreement), "agreement_stderr": stderr,
            "best_baseline": baselines[best], "baseline_name": best, "baselines": baselines, "pairs": result["pairs"],
            "below_baseline": float(agreement) < baselines[best],
            "position_consistency": float(result["position_consistency"][0]), "seconds": round(result["seconds"], 1),
            "annotations": sorted(annotations or {}), "judge": result["judge"]}


def unchecked(reason: str) -> dict:
    return {"status": "unchecked", "reason": reason}


def judge_check_file(cache_root: Path, judge: Judge, annotations: dict, pairs: int | None, draw_margin: float) -> Path:
    from harness.identity import config_hash

    key = config_hash({"judge": judge.identity(), "annotations": annotations, "pairs": pairs,
                       "draw_margin": float(draw_margin), "version": JUDGE_CHECK_VERSION})
    return Path(cache_root) / JUDGE_CHECK_FOLDER / f"{key}.json"


def cached_judge_check(judge: Judge, *, data_mirror: Path | None, cache_root: Path, pairs: int | None = JUDGE_CHECK_PAIRS,
                       draw_margin: float = 0.0) -> dict:
    """``judge_check_summary`` of ``judge`` on the first ``pairs`` GPT-4-annotated pairs of the mirror: computed once
    and kept in ``<cache_root>/judge_checks/`` by (judge identity, annotation files' SHA-256, pairs, draw margin) —
    ``align-harness judge-check`` with the same judge and ``--limit`` fills the same entry. ``unchecked`` (with the
    reason) when there is no mirror, no annotation file, or ``pairs`` is 0."""
    if pairs == 0:
        return unchecked("judge_check_pairs=0: the judge was not checked")
    if data_mirror is None:
        return unchecked("no data mirror: the GPT-4 annotations to check the judge against are not available here")
    annotations = annotations_identity(data_mirror)
    if annotations is None:
        return unchecked(f"no GPT-4 annotation files in {Path(data_mirror) / ANNOTATIONS_DIR}")
    from harness.inputs.cache import build_once, read_checked_json

    path = judge_check_file(cache_root, judge, annotations, pairs, draw_margin)

    def check() -> dict:
        rows = read_gpt4_annotations(Path(data_mirror), pairs)
        return store_judge_check(path, judge_check_summary(judge_agreement(judge, rows, draw_margin=draw_margin),
                                                           annotations))

    summary = build_once(path, "judge check", lambda: read_checked_json(path, "judge check"), check)
    return {**summary, "cache_file": path.name}


def store_judge_check(path: Path, summary: dict) -> dict:
    from harness.inputs.cache import write_checked_json

    write_checked_json(path, summary)
    return summary


def run_judge_check(task_config: dict, *, judge_type: str | None = None, limit: int | None = 32,
                    overrides: dict | None = None, draw_margin: float | None = None, data_mirror: str | None = None,
                    device: str = "cpu", batch_size: int = 8, cache_root: Path | None = None) -> str:
    """``align-harness judge-check``: the judge of ``task_config`` (the win-rate task's config, read by the CLI),
    changed by ``judge_type`` / ``overrides``, scored against the first ``limit`` GPT-4 annotations; returns the
    report. With ``cache_root`` the result is also kept where the win-rate task looks for it (``cached_judge_check``)."""
    config = dict(task_config.get("judge") or {})
    if judge_type is not None and judge_type != config.get("type", "local_hf"):
        config = {"type": judge_type, "max_output_chars": config.get("max_output_chars")}  # the model was the other type's
    config.update({key: value for key, value in (overrides or {}).items() if value is not None})
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HarnessError(f"--limit={limit!r} must be a positive number of annotated pairs")
    margin = task_config.get("draw_margin", 0.0) if draw_margin is None else draw_margin
    if not 0 <= margin < 0.5:
        raise HarnessError(f"--draw-margin={margin!r} must be a number in [0, 0.5)")
    judge = build_judge(config, device=device, batch_size=batch_size, cache_dir=cache_root)
    annotations = read_gpt4_annotations(Path(data_mirror) if data_mirror else None, limit)
    result = judge_agreement(judge, annotations, draw_margin=margin)
    if cache_root is not None:  # the win-rate task with this judge and judge_check_pairs=<limit> reads it from here
        identity = annotations_identity(Path(data_mirror))
        store_judge_check(judge_check_file(cache_root, judge, identity, limit, margin), judge_check_summary(result, identity))
    return judge_check_report(result, margin)


def judge_check_report(result: dict, draw_margin: float) -> str:
    def pm(value: float, stderr: float | None) -> str:
        return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"

    sources = sorted({item["source"] for item in result["items"]})
    judge, ours, gpt4 = result["judge"], result["judge_win_rate"], result["gpt4_win_rate"]
    methods = sorted({item["method"] for item in result["items"]})
    return "\n".join([
        f"judge: {judge['type']} {judge.get('model')} (max_output_chars={judge.get('max_output_chars')}, "
        f"draw_margin={draw_margin}, read by {', '.join(methods)})",
        f"pairs: {result['pairs']} GPT-4-annotated (alpaca_eval_gpt4) from {', '.join(sources)}; "
        f"output_1 = text-davinci-003, output_2 = the judged model"
        + (f"; {result['unannotated']} without a GPT-4 preference skipped" if result.get("unannotated") else ""),
        f"agreement with GPT-4: {pm(*result['agreement'])}",
        f"position consistency: {pm(*result['position_consistency'])}",
        f"win rate of output_2: judge {pm(ours.value, ours.stderr)} "
        f"(W/L/D {ours.wins}/{ours.losses}/{ours.draws}), GPT-4 {pm(gpt4.value, gpt4.stderr)} "
        f"(W/L/D {gpt4.wins}/{gpt4.losses}/{gpt4.draws})",
        f"baselines: always output_1 agrees {result['baseline_always_reference']:.3f}, "
        f"longer output agrees {result['baseline_longer_output']:.3f}",
        verdict_line(judge_check_summary(result)),
        f"seconds: {result['seconds']:.1f} ({result['seconds'] / max(result['pairs'], 1):.2f} per pair, both orders)",
    ])


def verdict_line(summary: dict) -> str:
    """One line on a judge check: below or above the better baseline (what the leaderboard's footnote says)."""
    if summary.get("status") != "checked":
        return f"judge not checked against GPT-4: {summary.get('reason')}"
    relation = "BELOW" if summary["below_baseline"] else "not below"
    return (f"judge agrees with GPT-4 {summary['agreement']:.3f} vs {summary['best_baseline']:.3f} for the "
            f"{summary['baseline_name'].replace('_', ' ')} baseline on {summary['pairs']} pairs: {relation} the better "
            f"baseline")
