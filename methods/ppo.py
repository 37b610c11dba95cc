"""RLHF with PPO — our own compact implementation (TRL 1.x has no PPO trainer).

The recipe is Ziegler et al. 2019 (arXiv:1909.08593) / Stiennon et al. 2020 / Ouyang et al. 2022
(arXiv:2203.02155) with the implementation details of Huang et al. 2024 (arXiv:2403.17031, "The N+
implementation details of RLHF with PPO"):

* policy πθ from ``job.start_checkpoint``; frozen reference π_ref = the same checkpoint;
* **value model**: a separate network (not a head shared with the policy), initialized from the
  **reward model** — Ouyang et al. 2022 §3.5 and Huang et al. 2024 (details on the critic): per-token
  values are the reward model's scalar head applied to every position's last hidden state. With a
  programmatic reward (no reward model), or a reward model with a different tokenizer, the value
  model is the starting checkpoint's backbone with a fresh scalar head;
* reward per completion token t (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):
  r_t = −β·(log πθ_old(y_t|·) − log π_ref(y_t|·)) (the k1 estimator, ``kl_estimate``), plus the
  reward model's score on the last token; β fixed or adapted (``AdaptiveKLController``);
* advantages by GAE (``gae``) from the rollout's values, whitened per rollout batch (``whiten``);
* several PPO epochs over each rollout batch in minibatches, clipped policy loss
  (``clipped_policy_loss``) + ``value_coef`` × clipped value loss (``clipped_value_loss``), one
  AdamW (eps 1e-5, Huang et al. 2024) over policy and value parameters (torch's fused kernel under the budget's
  ``adamw_torch_fused``);
* log-probs at the sampling temperature (logits / T, Huang et al. 2024), dropout disabled in every model.

**Budget.** The prompts are the budget's pairs' prompts (chosen and rejected responses are unused):
one rollout per prompt per PPO iteration, ``budget.batch_pairs`` prompts per iteration, ``budget.epochs``
passes over the prompts; completions are sampled up to ``budget.max_completion_tokens`` tokens.
``budget.precision`` applies as for the TRL methods (the plan's ``precision``, ``harness.train.plan``): weights
and the optimizer stay fp32, generation and every forward pass run under ``torch.autocast`` in bf16 / fp16
(fp16 with a gradient scaler); ``auto`` is bf16 on a GPU that supports it, else fp32; ``extra`` records
the precision used. Optimizer steps = iterations × ``ppo_epochs`` × ``minibatches`` (``updates_per_batch``:
the plan's ``optimizer_steps``, over which the budget's learning-rate schedule and the plan's warm-up run).
Forward passes run in micro-batches of the plan's ``sequence_batch`` = 2 × ``budget.micro_batch_pairs``
sequences (a pair is two sequences). ``budget.lora`` trains LoRA adapters on the policy (merged when saved).

**FLOPs.** The harness computes 6·N·policy_tokens + 2·N·reference_tokens with N = the saved policy's
parameters. PPO runs four models, so both counts are in *policy-parameter equivalents*: a token
through a model of N' parameters counts N'/N tokens. With s = prompt + completion tokens of a rollout:

* ``policy_tokens`` = ppo_epochs·s (policy, forward+backward) + ppo_epochs·s·N_value/N (value model);
* ``reference_tokens`` = s (generation: prompt prefill + one forward per sampled token, with a KV
  cache) + s (old log-probs) + s (reference log-probs) + s·N_value/N (old values)
  + reward-model tokens·N_reward/N.

``visit_cost`` gives the same sums for one prompt visit, for ``budget.match=tokens|flops``
(``harness.train.matching``): s = prompt + ``budget.max_completion_tokens``, N_value = N_reward when the value
model starts from the reward model, else ≈ N (the policy's backbone and a scalar head; an untied LM head is
not in it, so the estimate is a little high for untied models).

``TrainingOutcome.extra`` keeps the raw counts: ``generation_tokens``, ``reward_tokens``,
``value_tokens`` (value-model forward-only), ``value_trained_tokens``, ``policy_trained_tokens``,
``reference_forward_tokens`` and the parameter counts.

**Curves.** One entry per PPO iteration: mean reward (the reward model's score, without the KL
penalty), KL to the reference (mean over rollouts of Σ_t k1), policy entropy (nats per token), value
loss, policy loss, loss, clip fractions, β and the optimizer step reached.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.processes import (barrier, broadcast_from_first, process_device, process_group, sum_gradients,
                                     summed_stats)

# ----------------------------------------------------------------------------------------------
# the pieces: small pure functions, each with its paper equation


def masked_mean(values, mask=None, dim=None):
    """Mean of ``values`` over entries where ``mask`` is 1 (all entries without a mask)."""
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def whiten(values, mask=None, shift_mean: bool = True, eps: float = 1e-8):
    """Whitening (Huang et al. 2024, advantage normalization): (x − mean) / sqrt(var + eps).

    Mean and the *biased* (population) variance are taken over the masked entries, as TF's
    ``tf.nn.moments`` in the original OpenAI code. ``shift_mean=False`` keeps the mean (used for rewards).
    Masked-out entries come back as 0.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * (variance + eps).rsqrt()
    if not shift_mean:
        whitened = whitened + mean
    return whitened if mask is None else whitened * mask.to(values.dtype)


def gae(rewards, values, gamma: float, lam: float, mask=None):
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),    Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ·Â_{t+1},
        returns R_t = Â_t + V(s_t)   (the value targets).

    ``rewards`` and ``values`` are [..., T]; the episode ends after the last unmasked step, so
    V(s_T) = 0 and masked-out steps contribute nothing. Returns (advantages, returns).
    """
    import torch

    if mask is not None:
        mask = mask.to(values.dtype)
        rewards, values = rewards * mask, values * mask
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(steps)):
        next_value = values[..., t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last = delta + gamma * lam * last
        if mask is not None:
            last = last * mask[..., t]
        advantages[..., t] = last
    return advantages, advantages + values


def clipped_policy_loss(logp_new, logp_old, advantages, clip: float, mask=None):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), as a loss to minimize:

        ρ_t = exp(log πθ(a_t|s_t) − log πθ_old(a_t|s_t)),
        L = −E_t[ min(ρ_t·Â_t, clip(ρ_t, 1 − ε, 1 + ε)·Â_t) ].

    Returns (loss, clip fraction = share of tokens where the clipped term is the one taken).
    """
    import torch

    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    fraction = masked_mean((clipped > unclipped).to(logp_new.dtype), mask)
    return loss, fraction


def clipped_value_loss(values_new, values_old, returns, clip: float, mask=None):
    """Clipped value loss (Schulman et al. 2017's PPO2 code; Huang et al. 2024 keep it):

        V_clip = V_old + clip(V_new − V_old, −ε_v, ε_v),
        L_V = ½·E_t[ max((V_new − R_t)², (V_clip − R_t)²) ].

    Returns (loss, clip fraction = share of tokens where the clipped error is the larger one).
    """
    import torch

    clipped_values = values_old + torch.clamp(values_new - values_old, -clip, clip)
    error = (values_new - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    fraction = masked_mean((clipped_error > error).to(values_new.dtype), mask)
    return loss, fraction


def kl_estimate(logp, logp_ref, kind: str = "k1"):
    """Per-token estimators of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL divergence"):

        with r = π_ref(y)/π(y) = exp(log π_ref − log π):
        k1 = −log r = log π − log π_ref            (unbiased, can be negative per token);
        k2 = ½·(log r)²                             (biased, low variance, ≥ 0);
        k3 = (r − 1) − log r                        (unbiased, low variance, ≥ 0).
    """
    import torch

    log_ratio = logp_ref - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


class AdaptiveKLController:
    """The KL coefficient β, fixed or adapted toward a target KL (Ziegler et al. 2019, §2.2):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),    β_{t+1} = β_t·(1 + K_β·e_t),   K_β = n_steps / horizon,

    where KL_t is the batch's mean per-sequence KL and n_steps the rollouts in the batch. ``target=None``
    keeps β fixed.
    """

    def __init__(self, init: float, target: float | None = None, horizon: float = 10000):
        self.value = float(init)
        self.target = target
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def entropy_from_logits(logits):
    """Entropy H = logsumexp(z) − Σ softmax(z)·z of each categorical distribution (last dimension), in nats."""
    import torch

    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(-1)


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Rollout:
    """A batch of sampled completions, right-padded, with what PPO needs per completion token."""

    prompts: list           # chat messages
    input_ids: object       # [b, L] prompt + completion, right-padded
    attention_mask: object  # [b, L]
    positions: object       # [b, C] position of each completion token in input_ids
    tokens: object          # [b, C] completion token ids (0 where masked)
    mask: object            # [b, C] 1 for completion tokens
    lengths: list           # prompt + completion tokens per row (unpadded)
    texts: list             # decoded completions

    def select(self, rows):
        import torch

        index = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[index].sum(1).max())
        columns = int(self.mask[index].sum(1).max())
        return Rollout([self.prompts[i] for i in rows], self.input_ids[index][:, :width],
                       self.attention_mask[index][:, :width], self.positions[index][:, :columns],
                       self.tokens[index][:, :columns], self.mask[index][:, :columns],
                       [self.lengths[i] for i in rows], [self.texts[i] for i in rows])


def sample_rollout(policy, tokenizer, prompts: list, prompt_ids: list[list[int]], *, max_new_tokens: int,
                   temperature: float, batch_size: int, eos_ids: set, device: str) -> Rollout:
    """Sample one completion per prompt (left-padded generation), cut after the first EOS, re-laid right-padded."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    completions: list[list[int]] = []
    policy.eval()
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start: start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            generated = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                        pad_token_id=pad, eos_token_id=sorted(eos_ids))
        for row in generated[:, width:].tolist():
            cut = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
            completions.append(row[:cut])
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return layout(prompts, prompt_ids, completions, texts, pad)


def layout(prompts, prompt_ids, completions, texts, pad: int) -> Rollout:
    import torch

    rows = len(prompt_ids)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completions)]
    width, columns = max(lengths), max(max(len(c) for c in completions), 1)
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.ones((rows, columns), dtype=torch.long)
    tokens = torch.zeros((rows, columns), dtype=torch.long)
    mask = torch.zeros((rows, columns), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        sequence = prompt + completion
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        if completion:
            positions[row, : len(completion)] = torch.arange(len(prompt), len(sequence))
            tokens[row, : len(completion)] = torch.tensor(completion)
            mask[row, : len(completion)] = 1
    return Rollout(list(prompts), input_ids, attention, positions, tokens, mask, lengths, list(texts))


def completion_logprobs(model, batch: Rollout, temperature: float, device: str, with_entropy: bool = False):
    """log π(y_t | x, y_<t) of each completion token at the sampling temperature, and optionally the entropy."""
    import torch

    index = (batch.positions - 1).to(device)  # the logits at position p − 1 predict the token at p
    # logits_to_keep: the vocabulary projection only at those positions ([b, C, V], not [b, L, V])
    selected = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     logits_to_keep=index).logits.float() / temperature
    logps = torch.log_softmax(selected, dim=-1).gather(-1, batch.tokens.to(device).unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(selected) if with_entropy else None
    return logps, entropy


def completion_values(value_model, batch: Rollout, device: str):
    """V(s_t) before each completion token: the scalar head on the hidden state at position p − 1."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).last_hidden_state
    values = value_model.score(hidden).squeeze(-1).float()
    return values.gather(1, (batch.positions - 1).to(device))


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ----------------------------------------------------------------------------------------------
# the method


class PPO:
    data_view = "pairs"         # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True
    needs_reward = True
    data_parallel_only = True  # many processes (harness.run.launch): each holds the whole models; no FSDP / ZeRO-3
    memory_models = (2, 2)     # trained: policy, value model; frozen: reference, reward model (harness.train.memory_gate)

    def __init__(self, name: str = "ppo", learning_rate: float = 3e-6, kl_coef: float = 0.05,
                 adaptive_kl: bool = False, kl_target: float = 6.0, kl_horizon: float = 10000,
                 ppo_epochs: int = 4, minibatches: int = 1, clip: float = 0.2, value_clip: float = 0.2,
                 value_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95, temperature: float = 0.7,
                 whiten_rewards: bool = False, missing_eos_penalty: float | None = None,
                 value_init: str = "auto"):
        if value_init not in ("auto", "reward", "policy"):
            raise HarnessError(f"ppo: value_init={value_init!r}; choose auto, reward or policy (conf/method/ppo.yaml)")
        if ppo_epochs < 1 or minibatches < 1:
            raise HarnessError("ppo: ppo_epochs and minibatches must be at least 1 (conf/method/ppo.yaml)")
        self.name = name
        self.learning_rate = learning_rate
        self.kl_coef = kl_coef
        self.adaptive_kl = adaptive_kl
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.ppo_epochs = ppo_epochs
        self.minibatches = minibatches
        self.clip = clip
        self.value_clip = value_clip
        self.value_coef = value_coef
        self.gamma = gamma
        self.lam = lam
        self.temperature = temperature
        self.whiten_rewards = whiten_rewards
        self.missing_eos_penalty = missing_eos_penalty
        self.value_init = value_init


    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """(trained, forward-only) tokens of one prompt visit (one rollout), in policy-parameter equivalents:
        the per-rollout terms of the module docstring's **FLOPs** sums (``harness.train.matching``)."""
        sequence = prompt_tokens + completion_tokens
        value = self.value_share(sizes)
        trained = self.ppo_epochs * sequence * (1.0 + value)  # policy and value model, forward + backward
        # generation, old log-probs, reference log-probs, old values, the reward model
        forward_only = sequence * (3.0 + value + sizes.reward_share)
        return trained, forward_only

    def updates_per_batch(self, prompts: int) -> int:
        """Optimizer steps per rollout batch of ``prompts`` (the training plan's, ``harness.train.plan``)."""
        return self.ppo_epochs * min(self.minibatches, prompts)

    def value_share(self, sizes) -> float:
        """N_value / N as ``_value_source`` will pick the value model: the reward model's size when it starts from it."""
        from_reward = self.value_init != "policy" and sizes.reward > 0 and sizes.reward_reads_policy_tokens
        return sizes.reward_share if from_reward else 1.0

    def train(self, job: TrainingJob) -> TrainingOutcome:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, get_scheduler
        from harness.inputs.tokenizer_cache import load_tokenizer

        from harness.evaluate.generation import format_prompt
        from harness.train.rewards import reward_record
        from harness.train.trl_support import peft_config

        reward, plan, budget = job.reward, job.plan, job.budget
        if reward is None:
            raise HarnessError("ppo needs a reward: set reward=<name> (conf/reward/)")
        rank, world = process_group()
        device = process_device() if world > 1 else "cuda" if torch.cuda.is_available() else "cpu"
        precision, autocast = mixed_precision(plan.precision, device)
        scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
        torch.manual_seed(job.seed)
        generator = random.Random(job.seed)

        tokenizer = load_tokenizer(job.start_checkpoint)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(job.start_checkpoint, dtype=torch.float32).to(device)
        reference = AutoModelForCausalLM.from_pretrained(job.start_checkpoint, dtype=torch.float32).to(device).eval()
        reference.requires_grad_(False)
        value_source = self._value_source(reward, tokenizer, job)
        value_model = AutoModelForSequenceClassification.from_pretrained(value_source, num_labels=1,
                                                                         dtype=torch.float32).to(device)
        for model in (policy, reference, value_model):
            disable_dropout(model)
        lora = peft_config(job)
        if lora is not None:
            from peft import get_peft_model

            policy = get_peft_model(policy, lora)
        eos_ids = {tokenizer.eos_token_id}
        configured = policy.generation_config.eos_token_id
        eos_ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        sampler = vllm_sampler(policy, tokenizer, job, temperature=self.temperature) if job.engine == "vllm" else None

        use_template = bool(getattr(tokenizer, "chat_template", None))
        prompts = [row["prompt"] for row in plan.rows]
        prompt_ids = [tokenizer(format_prompt(tokenizer, p, use_template), add_special_tokens=False)["input_ids"]
                      for p in prompts]
        batch, micro = budget.batch_pairs, plan.sequence_batch
        trainable = [p for p in list(policy.parameters()) + list(value_model.parameters()) if p.requires_grad]
        # the budget's optimizer: adamw_torch_fused = torch's fused kernel (4x the multi-tensor one's speed on a CPU)
        fused = budget.optimizer.endswith("_fused")
        optimizer = torch.optim.AdamW(trainable, lr=self.learning_rate, eps=1e-5, weight_decay=budget.weight_decay,
                                      fused=True if fused else None, foreach=None if fused else True)
        scheduler = get_scheduler(budget.lr_scheduler, optimizer, num_warmup_steps=plan.warmup_steps,
                                  num_training_steps=plan.optimizer_steps)
        kl_control = AdaptiveKLController(self.kl_coef, self.kl_target if self.adaptive_kl else None, self.kl_horizon)

        n_value = sum(p.numel() for p in value_model.parameters())
        counts = {"generation_tokens": 0, "old_logprob_tokens": 0, "reference_forward_tokens": 0, "value_tokens": 0,
                  "reward_tokens": 0, "policy_trained_tokens": 0, "value_trained_tokens": 0}
        curves: list[dict] = []
        steps = rollouts = 0
        for epoch in range(plan.epochs):
            order = list(range(len(prompts)))
            generator.shuffle(order)
            for start in range(0, len(order), batch):
                rows = order[start: start + batch]
                # 1. rollout: sample, score, and take log-probs, reference log-probs and values (no gradients).
                # With many processes rank 0 samples and scores the whole batch and sends it to the others, so the
                # samples are the 1-process run's whatever the number of processes (harness.run.launch)
                rollout = scored = None
                if rank == 0:
                    batch_prompts, batch_ids = [prompts[i] for i in rows], [prompt_ids[i] for i in rows]
                    if sampler is not None:  # engine=vllm: TRL's colocated vLLM engine, the policy's current weights
                        rollout = vllm_rollout(sampler, tokenizer, batch_prompts, batch_ids, eos_ids=eos_ids)
                    else:
                        with autocast():
                            rollout = sample_rollout(policy, tokenizer, batch_prompts, batch_ids,
                                                     max_new_tokens=budget.max_completion_tokens,
                                                     temperature=self.temperature, batch_size=micro, eos_ids=eos_ids,
                                                     device=device)
                    before = reward.tokens_scored
                    scored = (reward.score(rollout.prompts, rollout.texts), reward.tokens_scored - before)
                rollout, scored = broadcast_from_first((rollout, scored), world)
                scores = torch.tensor(scored[0], dtype=torch.float32, device=device)
                counts["reward_tokens"] += scored[1]
                old_logps, ref_logps, old_values, entropies = [], [], [], []
                policy.eval()
                value_model.eval()
                with torch.no_grad(), autocast():
                    for chunk in _chunks(list(range(len(rows))), micro):
                        part = rollout.select(chunk)
                        logps, entropy = completion_logprobs(policy, part, self.temperature, device, with_entropy=True)
                        old_logps.append(_pad_to(logps, rollout.mask.shape[1]))
                        entropies.append(_pad_to(entropy, rollout.mask.shape[1]))
                        ref_logps.append(_pad_to(completion_logprobs(reference, part, self.temperature, device)[0],
                                                 rollout.mask.shape[1]))
                        old_values.append(_pad_to(completion_values(value_model, part, device), rollout.mask.shape[1]))
                mask = rollout.mask.to(device).float()
                old_logps, ref_logps = torch.cat(old_logps) * mask, torch.cat(ref_logps) * mask
                old_values, entropies = torch.cat(old_values) * mask, torch.cat(entropies)
                tokens = sum(rollout.lengths)
                for key in ("generation_tokens", "old_logprob_tokens", "reference_forward_tokens", "value_tokens"):
                    counts[key] += tokens
                # 2. rewards: −β·k1 per token, the score on the last completion token
                if self.missing_eos_penalty is not None:  # Huang et al. 2024's "EOS trick"
                    ended = torch.tensor([int(m.sum()) > 0 and int(r[int(m.sum()) - 1]) in eos_ids
                                          for r, m in zip(rollout.tokens, rollout.mask)], device=device)
                    scores = torch.where(ended, scores, scores - self.missing_eos_penalty)
                kl = kl_estimate(old_logps, ref_logps, "k1") * mask
                rewards = -kl_control.value * kl
                last = (rollout.mask.sum(1) - 1).clamp(min=0).to(device)
                rewards[torch.arange(len(rows), device=device), last] += scores
                if self.whiten_rewards:
                    rewards = whiten(rewards, mask, shift_mean=False)
                # 3. advantages and returns
                advantages, returns = gae(rewards, old_values, self.gamma, self.lam, mask)
                advantages = whiten(advantages, mask)
                # 4. PPO epochs over minibatches
                stats = {"loss": [], "policy_loss": [], "value_loss": [], "clip_fraction": [],
                         "value_clip_fraction": [], "approx_kl": []}
                policy.train()
                value_model.train()
                for _ in range(self.ppo_epochs):
                    shuffled = list(range(len(rows)))
                    generator.shuffle(shuffled)
                    for minibatch in _split(shuffled, min(self.minibatches, len(rows))):
                        optimizer.zero_grad()
                        # many processes: each takes every world-th micro-batch of the minibatch, the gradients are
                        # summed over the processes (sum_gradients), so the step is the 1-process step
                        for chunk in _chunks(minibatch, micro)[rank::world]:
                            part = rollout.select(chunk)
                            columns = part.mask.shape[1]
                            index = torch.as_tensor(chunk, device=device)
                            part_mask = part.mask.to(device).float()
                            with autocast():  # log-probs and values come out in fp32 (.float()), so do the losses
                                new_logps, _ = completion_logprobs(policy, part, self.temperature, device)
                                new_values = completion_values(value_model, part, device)
                            policy_loss, clip_fraction = clipped_policy_loss(
                                new_logps, old_logps[index, :columns], advantages[index, :columns], self.clip, part_mask)
                            value_loss, value_clip_fraction = clipped_value_loss(
                                new_values, old_values[index, :columns], returns[index, :columns], self.value_clip,
                                part_mask)
                            loss = policy_loss + self.value_coef * value_loss
                            scaler.scale(loss * len(chunk) / len(minibatch)).backward()
                            with torch.no_grad():
                                approx_kl = masked_mean(kl_estimate(old_logps[index, :columns], new_logps, "k3"), part_mask)
                            for key, value in (("loss", loss), ("policy_loss", policy_loss), ("value_loss", value_loss),
                                               ("clip_fraction", clip_fraction),
                                               ("value_clip_fraction", value_clip_fraction), ("approx_kl", approx_kl)):
                                stats[key].append(float(value.detach()))
                        sum_gradients(trainable, world)
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(trainable, budget.max_grad_norm)
                        scaler.step(optimizer)
                        scaler.update()
                        scheduler.step()
                        steps += 1
                counts["policy_trained_tokens"] += self.ppo_epochs * tokens
                counts["value_trained_tokens"] += self.ppo_epochs * tokens
                rollouts += len(rows)
                sequence_kl = float(kl.sum(1).mean())
                curves.append({
                    "step": steps, "epoch": epoch + 1, "rollouts": rollouts,
                    "reward": float(scores.mean()), "reward_std": float(scores.std()) if len(rows) > 1 else 0.0,
                    "kl": sequence_kl, "kl_coef": kl_control.value,
                    "entropy": float(masked_mean(entropies.to(device), mask)),
                    "completion_tokens": float(rollout.mask.sum(1).float().mean()),
                    "learning_rate": scheduler.get_last_lr()[0],
                    **{key: total / count for key, (total, count) in summed_stats(stats, world).items()},
                })
                kl_control.update(sequence_kl, len(rows))

        if hasattr(policy, "merge_and_unload"):
            policy = policy.merge_and_unload()
        if rank == 0:  # every process holds the same weights (same summed gradients, same optimizer steps)
            policy.save_pretrained(job.output_dir)
            tokenizer.save_pretrained(job.output_dir)
            shutil.rmtree(job.scratch_dir, ignore_errors=True)
        barrier(world)
        n_policy = sum(p.numel() for p in policy.parameters())
        value_share, reward_share = n_value / n_policy, reward.parameters / n_policy
        policy_tokens = counts["policy_trained_tokens"] + counts["value_trained_tokens"] * value_share
        reference_tokens = (counts["generation_tokens"] + counts["old_logprob_tokens"]
                            + counts["reference_forward_tokens"] + counts["value_tokens"] * value_share
                            + counts["reward_tokens"] * reward_share)
        extra = {**counts, "policy_parameters": n_policy, "value_parameters": n_value,
                 "reward_parameters": reward.parameters, "value_init": str(value_source),
                 "iterations": len(curves), "final_kl_coef": kl_control.value, "precision": precision,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)", "reward": reward_record(reward)}
        return TrainingOutcome(optimizer_steps=steps, examples=rollouts, pairs=float(rollouts),
                               policy_tokens=round(policy_tokens), reference_tokens=round(reference_tokens),
                               curves=curves, extra=extra)

    def _value_source(self, reward, tokenizer, job):
        """The reward model (Ouyang et al. 2022; Huang et al. 2024) when it reads the policy's tokens, else the policy."""
        path = getattr(reward, "path", None)
        if self.value_init == "policy" or path is None:
            if self.value_init == "reward":
                raise HarnessError(f"ppo: value_init=reward but reward {reward.kind!r} has no model; use value_init=auto")
            return job.start_checkpoint
        from harness.inputs.tokenizer_cache import load_tokenizer

        same_tokens = load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
        if not same_tokens:
            if self.value_init == "reward":
                raise HarnessError("ppo: value_init=reward but the reward model's tokenizer differs from the policy's")
            return job.start_checkpoint
        return path


# ----------------------------------------------------------------------------------------------
# sampling through vLLM (engine=vllm)


def vllm_sampler_arguments(job: TrainingJob, temperature: float) -> dict:
    """The arguments of TRL's ``VLLMGeneration`` for PPO's rollouts: colocated on the training GPU, as TRL's online
    trainers run it (``harness.evaluate.engines.trl_sampling_arguments``), sampling like ``sample_rollout`` (the whole
    vocabulary at ``temperature``, up to ``budget.max_completion_tokens``)."""
    from harness.evaluate.engines import trl_sampling_arguments

    trl = trl_sampling_arguments("vllm")
    return {"mode": trl["vllm_mode"], "gpu_memory_utilization": trl["vllm_gpu_memory_utilization"],
            "temperature": temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
            "max_completion_length": job.budget.max_completion_tokens, "logprobs": None,
            "max_model_length": job.plan.max_length + job.budget.max_completion_tokens}


def vllm_sampler(policy, tokenizer, job: TrainingJob, *, temperature: float):
    """TRL's colocated vLLM engine (``trl.generation.vllm_generation.VLLMGeneration``) over the policy: the engine TRL's
    online methods sample with under ``engine=vllm``; ``vllm_rollout`` pushes the policy's weights before each batch."""
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(policy, Accelerator(), tokenizer, **vllm_sampler_arguments(job, temperature))


def vllm_rollout(sampler, tokenizer, prompts: list, prompt_ids: list[list[int]], *, eos_ids: set) -> Rollout:
    """One completion per prompt from the policy's current weights through vLLM, laid out as ``sample_rollout``'s."""
    sampler.sync_weights()
    _, completion_ids, _, _ = sampler.generate(prompt_ids, None, 1)
    completions = []
    for row in completion_ids:
        row = list(row)
        cut = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        completions.append(row[:cut])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return layout(prompts, prompt_ids, completions, tokenizer.batch_decode(completions, skip_special_tokens=True), pad)


def mixed_precision(precision: str, device: str):
    """(precision used, a context factory): ``torch.autocast`` in bf16 / fp16 as the plan's resolved ``precision``
    says (the TRL methods get the same through ``trl_arguments``), a no-op for fp32."""
    import contextlib

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return "fp32", contextlib.nullcontext
    return precision, lambda: torch.autocast(device_type=device, dtype=dtype)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def _split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous near-equal minibatches."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _pad_to(tensor, columns: int):
    import torch.nn.functional as F

    return F.pad(tensor, (0, columns - tensor.shape[1]))
