"""Rewards for online and RL methods (PPO, RLOO, GRPO, online DPO, iterative DPO, SPPO) and reward-model judges.

``build_reward(cfg, context)`` turns ``conf/reward/<name>.yaml`` (Hydra group ``reward``; the sweep's
default is ``bradley-terry``) into a reward object with

* ``score(prompts, completions) -> list[float]`` — ``prompts`` are chat messages (the harness's data
  schema), ``completions`` the assistant's text;
* ``kind`` and ``identity`` (a JSON-able dict naming exactly what scores: for the run id and the record);
* ``parameters`` — the reward model's parameter count for FLOPs accounting (0 when programmatic);
* ``tokens_scored`` — tokens the reward model has read so far (forward-only; 0 when programmatic);
* for model rewards: ``path`` (a sequence-classification checkpoint any judge can load with
  ``ModelReward.from_path``) and ``heldout_accuracy``.

Kinds:

* ``bradley-terry`` — a pointwise reward model r(x, y) trained with TRL's ``RewardTrainer`` on the
  preference pairs, loss −log σ(r(x, y_w) − r(x, y_l)) (Bradley & Terry 1952; Stiennon et al. 2020,
  eq. 1; Ouyang et al. 2022, eq. 1). It starts from the setting's starting checkpoint with a fresh
  scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``) and trains on the first
  ``budget.pairs`` pairs of the train split, cut to the budget's lengths exactly as methods see them
  (``harness.train.plan.cut_to_budget``); the budget is the sweep's ``stage_budget``. After training its
  scores are shifted so that the mean score of the training pairs' chosen responses is 0 — the
  reward normalization of Huang et al. 2024 (§6, "normalize the reward on SFT demonstrations"),
  which keeps the KL penalty's β meaningful. Its pairwise accuracy on the first
  ``heldout_pairs`` held-out pairs is recorded. Cached in ``<cache>/rewards/`` by a hash of
  (starting checkpoint, pairs, budget, reward config): a second build with the same inputs loads it, when it
  matches its manifest (``harness.inputs.cache``; a damaged one is trained again).
* ``short-answers`` — programmatic, for tests: r = 1 − min(len(completion in characters) / max_chars, 1),
  so 1 for an empty answer, 0 at ``max_chars`` characters or more. Characters rather than tokens
  so that a tiny random policy, which almost never samples EOS, still gets a graded signal (shorter
  tokens score higher).
* ``path`` — an existing sequence-classification checkpoint (``path: /models/my-rm``), scores used raw.

Methods that take their reward as a TRL reward function use ``trl_reward_function`` below, which also
counts what the trainer generated.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.inputs.cache import build_once, discard, is_whole, publish
from harness.inputs.paths import atomic_write_text, temporary_path
from harness.identity import config_hash

log = logging.getLogger("harness")
KINDS = ("bradley-terry", "short-answers", "path")
MODEL_INFO = "reward_model.json"  # written beside a cached reward model: accuracy, normalization, cost


@dataclass(frozen=True)
class RewardModelTraining:
    """What the training plan (``harness.train.plan.plan_training``) needs to know of a Bradley-Terry reward model:
    it trains on pairs, one example a pair."""

    name: str = "bradley-terry"
    data_view: str = "pairs"


REWARD_MODEL = RewardModelTraining()


# ----------------------------------------------------------------------------------------------
# programmatic rewards


@dataclass
class ShortAnswers:
    """r = 1 − min(len(y) / max_chars, 1): prefers short completions (characters of the decoded text)."""

    max_chars: int = 256
    kind: str = "short-answers"
    parameters: int = 0
    tokens_scored: int = 0
    path: None = None
    heldout_accuracy: None = None

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "max_chars": self.max_chars}

    def score(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        return [1.0 - min(len(text) / self.max_chars, 1.0) for text in completions]


# ----------------------------------------------------------------------------------------------
# reward models


@dataclass
class ModelReward:
    """A sequence-classification checkpoint read at the last token of prompt + completion.

    Sequences are rendered the way TRL's ``RewardTrainer`` renders conversational pairs (the whole
    conversation through the chat template; plain ``Human:/Assistant:`` text without one), right-padded;
    the score is ``logits[0]`` at the last non-pad token, minus ``bias``.
    """

    path: Path
    kind: str
    identity: dict
    bias: float = 0.0
    heldout_accuracy: float | None = None
    info: dict = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 8
    tokens_scored: int = 0
    cache_hit: bool | None = None   # bradley-terry: True when loaded from the cache rather than trained

    def __post_init__(self):
        self.path = Path(self.path)
        self._model = None
        self._tokenizer = None
        self.parameters = parameter_count(self.path)
        if not self.parameters:  # weights not in safetensors (e.g. pytorch_model.bin): count the loaded model
            self.parameters = sum(p.numel() for p in self.load()[0].parameters())

    @classmethod
    def from_path(cls, path: Path, *, device: str = "cpu", batch_size: int = 8) -> "ModelReward":
        """Load a reward model (one this module trained, with its normalization, or any other)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise HarnessError(f"reward model {path}: no model folder there (no config.json); set reward.path=<folder>")
        info = json.loads((path / MODEL_INFO).read_text()) if (path / MODEL_INFO).exists() else {}
        identity = info.get("identity") or {"kind": "path", "path": str(path.resolve()), "weights": weight_identity(path)}
        return cls(path=path, kind=info.get("kind", "path"), identity=identity, bias=info.get("bias", 0.0),
                   heldout_accuracy=info.get("heldout_accuracy"), info=info, device=device, batch_size=batch_size)

    def load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForSequenceClassification
            from harness.inputs.tokenizer_cache import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=1,
                                                                             dtype=torch.float32).to(self.device).eval()
            self._model.config.get_text_config().pad_token_id = self._tokenizer.pad_token_id
        return self._model, self._tokenizer

    @property
    def tokenizer(self):
        return self.load()[1]

    def token_ids(self, prompt: list[dict], completion: str) -> list[int]:
        from harness.evaluate.logprobs import render

        prompt_ids, completion_ids = render(self.tokenizer, prompt, completion)
        return prompt_ids + completion_ids

    def score(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        import torch

        model, tokenizer = self.load()
        sequences = [self.token_ids(p, c) for p, c in zip(prompts, completions)]
        pad = tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start: start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sequence in enumerate(chunk):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores.extend((logits[:, 0].float() - self.bias).tolist())
            self.tokens_scored += sum(len(s) for s in chunk)
        return scores


def parameter_count(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def weight_identity(path: Path) -> list:
    """What identifies a checkpoint's weights cheaply: file names, sizes and modification times."""
    weights = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    return [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> tuple[float, float]:
    """Share of pairs with r(chosen) > r(rejected) (ties count half) and its standard error."""
    outcomes = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(outcomes) / n
    variance = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)


# ----------------------------------------------------------------------------------------------
# building


def run_identity(cfg, stage_budget) -> dict:
    """What a run's id must hash about its reward, known before the reward is built: the reward config and,
    for a trained reward model, the budget it trains under (its data and starting checkpoint are already
    part of the run's identity)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    if values.get("pairs") is None:  # unset: the stage budget's (below); run ids stay those from before reward.pairs
        values.pop("pairs", None)
    if values.get("kind") == "bradley-terry":
        values["budget"] = stage_budget.as_dict()
    return values


def reward_budget(cfg, stage_budget):
    """The budget a trained reward model trains under: ``stage_budget``, with ``reward.pairs`` training pairs when set
    (null: the stage budget's own). A bad value is refused in one line."""
    from dataclasses import replace

    pairs = cfg.get("pairs") if cfg is not None else None
    if pairs is None or cfg.get("kind") != "bradley-terry":
        return stage_budget
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise HarnessError(f"reward.pairs={pairs!r}: give a whole number of training pairs (>= 1) for the reward model, "
                           f"or null for stage_budget.pairs ({stage_budget.pairs})")
    return replace(stage_budget, pairs=pairs)


def build_reward(cfg, context):
    """The reward ``conf/reward/<name>.yaml`` describes, for ``context`` (a ``harness.protocols.RewardContext``)."""
    kind = cfg.get("kind")
    if kind == "short-answers":
        return ShortAnswers(max_chars=int(cfg.get("max_chars", 256)))
    if kind == "path":
        if not cfg.get("path"):
            raise HarnessError("reward=path needs reward.path=<sequence-classification checkpoint folder>")
        return ModelReward.from_path(Path(cfg.path).expanduser(), device=context.device,
                                     batch_size=int(cfg.get("batch_size", 8)))
    if kind == "bradley-terry":
        return bradley_terry_reward(cfg, context)
    raise HarnessError(f"reward.kind={kind!r} is unknown; available: {', '.join(KINDS)} (conf/reward/)")


def bradley_terry_reward(cfg, context) -> ModelReward:
    """Train (or load from the cache) the Bradley-Terry reward model of ``context`` (see module docstring)."""
    from harness.inputs.tokenizer_cache import load_tokenizer

    from harness.train.plan import plan_training

    budget = context.budget
    start = Path(context.start_checkpoint)
    tokenizer = load_tokenizer(start)
    heldout_rows = context.heldout_pairs[: int(cfg.get("heldout_pairs", 64))]
    # not one of the compared methods: the budget's pairs for its epochs, whatever budget.match
    plan = plan_training(budget, REWARD_MODEL, context.train_pairs, heldout_rows, tokenizer, match=False)
    train, heldout = plan.rows, plan.heldout
    settings = {k: cfg.get(k) for k in ("learning_rate", "normalize", "center_rewards_coefficient")}
    identity = {"kind": "bradley-terry", "start": {"path": str(start.resolve()), "weights": weight_identity(start)},
                "train": train, "heldout": heldout, "budget": budget.as_dict(), "settings": settings}
    key = config_hash(identity)
    summary = {"kind": "bradley-terry", "key": key, "start": str(start), "budget": budget.name,
               "pairs": len(train), "settings": settings}
    target = Path(context.cache_dir) / f"bradley-terry-{key}"
    trained_here = []

    def train_it() -> Path:
        trained_here.append(True)
        log.info("  reward: training a Bradley-Terry reward model on %d pairs (%s)", len(train), key)
        _train_bradley_terry(cfg, context, start, plan, summary, target)
        return target

    # its manifest matches (harness.inputs.cache); units sharing it train it once (build_once)
    build_once(target, "reward model", lambda: target if is_whole(target, "reward model") else None, train_it)
    hit = not trained_here
    if hit:
        log.info("  reward: Bradley-Terry reward model %s cached", key)
    reward = ModelReward.from_path(target, device=context.device, batch_size=int(cfg.get("batch_size", 8)))
    reward.cache_hit = hit
    return reward


def _train_bradley_terry(cfg, context, start: Path, plan, summary: dict, target: Path) -> None:
    import torch
    from datasets import Dataset
    from harness.inputs.tokenizer_cache import load_tokenizer
    from trl import RewardConfig, RewardTrainer

    from harness.evaluate.logprobs import PLAIN_ROLES
    from harness.protocols import TrainingJob
    from harness.train.trl_support import to_conversational, trl_arguments

    budget, train, heldout = plan.budget, plan.rows, plan.heldout
    staging = temporary_path(target)
    discard(staging)
    scratch = temporary_path(target, "scratch")
    tokenizer = load_tokenizer(start)
    if getattr(tokenizer, "chat_template", None):
        rows = to_conversational(train)
    else:  # no chat template (a pretrained base): plain HH text, as harness.evaluate.logprobs.render scores it
        rows = [{"prompt": "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in r["prompt"]) + "\n\nAssistant:",
                 "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in train]
    job = TrainingJob(start_checkpoint=start, output_dir=staging, plan=plan, seed=budget.seed, scratch_dir=scratch)
    arguments = trl_arguments(job, learning_rate=float(cfg.learning_rate))
    config = RewardConfig(**arguments, center_rewards_coefficient=cfg.get("center_rewards_coefficient"))
    began = time.perf_counter()
    trainer = RewardTrainer(model=str(start), args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.train()
    trained_tokens = sum(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in trainer.train_dataset[column])
    trainer.model.save_pretrained(staging)
    trainer.processing_class.save_pretrained(staging)
    curves = [entry for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    del trainer
    shutil.rmtree(scratch, ignore_errors=True)

    model = ModelReward(path=staging, kind="bradley-terry", identity={}, device=context.device,
                        batch_size=int(cfg.get("batch_size", 8)))
    bias = 0.0
    if cfg.get("normalize", True):  # Huang et al. 2024: mean reward of the demonstrations (chosen responses) = 0
        demonstrations = train[: int(cfg.get("normalize_pairs", 256))]
        chosen = model.score([r["prompt"] for r in demonstrations], [r["chosen"] for r in demonstrations])
        bias = sum(chosen) / len(chosen)
    prompts = [r["prompt"] for r in heldout]
    chosen = model.score(prompts, [r["chosen"] for r in heldout])
    rejected = model.score(prompts, [r["rejected"] for r in heldout])
    accuracy, stderr = pairwise_accuracy(chosen, rejected)
    parameters = model.parameters
    info = {**summary, "identity": {"kind": "bradley-terry", "key": summary["key"]}, "bias": bias,
            "heldout_accuracy": accuracy, "heldout_accuracy_stderr": stderr, "heldout_pairs": len(heldout),
            "consumed": {"optimizer_steps": steps, "pairs": plan.visits, "trained_tokens": trained_tokens,
                         "scored_tokens": model.tokens_scored, "parameters": parameters,
                         "flops": 6.0 * parameters * trained_tokens + 2.0 * parameters * model.tokens_scored,
                         "wall_seconds": round(time.perf_counter() - began, 2)}}
    atomic_write_text(staging / "curves.jsonl", "".join(json.dumps(c) + "\n" for c in curves))
    atomic_write_text(staging / MODEL_INFO, json.dumps(info, indent=2))
    log.info("  reward: held-out pairwise accuracy %.3f ± %.3f on %d pairs", accuracy, stderr, len(heldout))
    publish(staging, target)  # another process may have published the same reward model first: then that one is kept
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# TRL reward functions


def trl_reward_function(reward, tokenizer):
    """``reward.score`` as a TRL reward function ``(prompts, completions, completion_ids, **kw) -> list[float]``.

    The function's ``usage`` dict counts what the trainer generated and had scored: ``completions``,
    ``prompt_tokens`` (the prompt as the policy's chat template renders it) and ``completion_tokens``
    (up to and including the first EOS). ``rewards`` keeps the mean reward of each call.
    """
    eos = {tokenizer.eos_token_id}
    usage = {"calls": 0, "completions": 0, "prompt_tokens": 0, "completion_tokens": 0}
    means: list[float] = []
    prompt_lengths: dict[str, int] = {}

    def prompt_length(prompt) -> int:
        key = json.dumps(prompt, sort_keys=True)
        if key not in prompt_lengths:
            if isinstance(prompt, list):
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            else:
                text = prompt
            prompt_lengths[key] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return prompt_lengths[key]

    def completion_length(ids) -> int:
        ids = list(ids)
        for index, token in enumerate(ids):
            if token in eos:
                return index + 1
        while ids and ids[-1] == tokenizer.pad_token_id:
            ids.pop()
        return len(ids)

    def reward_function(prompts, completions, completion_ids=None, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        scores = reward.score(messages, texts)
        usage["calls"] += 1
        usage["completions"] += len(texts)
        usage["prompt_tokens"] += sum(prompt_length(p) for p in prompts)
        if completion_ids is not None:
            usage["completion_tokens"] += sum(completion_length(ids) for ids in completion_ids)
        else:
            usage["completion_tokens"] += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        means.append(sum(scores) / max(len(scores), 1))
        return scores

    reward_function.__name__ = f"reward_{reward.kind.replace('-', '_')}"
    reward_function.usage = usage
    reward_function.rewards = means
    return reward_function


def reward_record(reward) -> dict:
    """What a method puts into ``TrainingOutcome.extra['reward']``."""
    out = {"kind": reward.kind, "identity": reward.identity, "parameters": reward.parameters}
    if getattr(reward, "path", None):
        out["path"] = str(reward.path)
        out["heldout_accuracy"] = reward.heldout_accuracy
        out["cache_hit"] = reward.cache_hit
        if reward.info.get("consumed"):  # the reward model's own, one-off training cost (shared by every method)
            out["training"] = reward.info["consumed"]
    return out
