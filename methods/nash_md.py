"""Nash-MD — Nash learning from human feedback by mirror descent, its policy-gradient form Nash-MD-PG (Munos et al.
2023, "Nash learning from human feedback", arXiv:2312.00886, §7), on TRL's experimental ``OnlineDPOTrainer``.

TRL 1.16 no longer ships the ``NashMDTrainer`` earlier releases had in ``trl.experimental.nash_md``; the adapter keeps
TRL's online trainer (prompt-only data, the budget's steps, the reference model, generation settings, logging) and
replaces its ``training_step`` with Nash-MD's. Each optimizer step, for ``budget.batch_pairs`` prompts x:

1. **sample** y ~ π_θ(·|x) from the current policy and y' ~ π^β_mix(·|x) from the *geometric mixture* of the policy and
   the reference μ (the starting checkpoint), π^β_mix ∝ π_θ^{1−β} μ^β, formed token by token on the logits
   (``geometric_mixture_logits``, ``mixture_coef`` = β);
2. **preference** p = P(y ≻ y' | x): from the sweep's reward through a Bradley–Terry link σ(r(y) − r(y')), or from a
   pairwise judge (``judge:``, a ``harness.evaluate.judges`` config, both presentation orders averaged), as ``sppo``;
3. **update** on the policy-gradient surrogate ``nash_md_loss``: the REINFORCE estimate of the gradient of
   P(π_θ ≻ π^β_mix) − τ·KL(π_θ ‖ μ), with ½ as control variate (``beta`` = τ).

**Budget**: ``budget.batch_pairs`` prompts per optimizer step, ``budget.epochs`` passes over the budget's prompts,
completions up to ``budget.max_completion_tokens`` (as ``online_dpo``).
**Tokens / FLOPs** (policy-parameter equivalents, see ``methods/ppo.py``): with G = prompt + completion tokens of the
policy sample and G' of the mixture sample, ``policy_tokens`` = G (the policy sample is trained), ``reference_tokens``
= G + G' (generation) + G' (the reference's logits during mixture sampling) + G (reference log-probs) + the oracle's
reading (reward: its tokens × N_reward/N; a local judge: its prompt tokens × N_judge/N; an API judge: not counted).
``visit_cost`` gives the same sums for one prompt visit for ``budget.match=tokens|flops`` (``harness.train.matching``).
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


def geometric_mixture_logits(policy_logits, reference_logits, mixture: float):
    """log π^β_mix = log_softmax((1 − β)·log π_θ + β·log μ) over the vocabulary: the normalized geometric mixture
    π^β_mix(y) ∝ π_θ(y)^{1−β} μ(y)^β of Munos et al. 2023 (§6, the mixture policy of Nash-MD), applied to each next-token
    distribution. Departure: the paper defines the mixture on whole responses; per token (as TRL's removed
    ``GeometricMixtureWrapper`` did) is what autoregressive sampling can draw from."""
    import torch.nn.functional as F

    mixed = (1.0 - mixture) * F.log_softmax(policy_logits.float(), dim=-1) \
        + mixture * F.log_softmax(reference_logits.float(), dim=-1)
    return F.log_softmax(mixed, dim=-1)


def nash_md_loss(policy_logps, reference_logps, mask, preference, beta: float):
    """Nash-MD-PG's surrogate loss for a batch of policy samples y ~ π_θ, each against a mixture sample y' ~ π^β_mix
    (Munos et al. 2023, §7): its gradient is the REINFORCE estimate

        −∇θ [P(π_θ ≻ π^β_mix) − τ·KL(π_θ ‖ μ)] ≈ −(p − ½ − τ·log π_θ(y)/μ(y)) · ∇θ log π_θ(y),

    p = P(y ≻ y'), ½ the control variate, τ = ``beta``; the log-ratio is held fixed (no gradient), so the loss is

        L = mean over the batch of  −(p − ½)·log π_θ(y) + τ·sg(log π_θ(y) − log μ(y))·log π_θ(y).

    ``policy_logps`` / ``reference_logps``: per-token log-probabilities of the completion tokens [batch, tokens],
    ``mask``: 1 on completion tokens, ``preference``: p per sample. log π(y) sums the masked tokens (the paper's
    sequence-level KL estimate; TRL's removed ``NashMDTrainer`` multiplied token by token instead).
    Returns (loss, the score term (p − ½)·log π_θ(y), the sequence log-ratio log π_θ(y)/μ(y)) per sample."""
    import torch

    mask = mask.to(policy_logps.dtype)
    sequence_logp = (policy_logps * mask).sum(-1)
    with torch.no_grad():
        log_ratio = ((policy_logps - reference_logps) * mask).sum(-1)
    score = (preference - 0.5) * sequence_logp
    loss = (beta * log_ratio * sequence_logp - score).mean()
    return loss, score, log_ratio


class NashMD:
    data_view = "pairs"        # only the prompts are used
    prompts_only = True        # samples its own responses: the data's responses and labels are unused
    reference_based = True

    def __init__(self, name: str = "nash_md", learning_rate: float = 5e-7, beta: float = 0.008,
                 mixture_coef: float = 0.125, temperature: float = 0.9, judge: dict | None = None):
        from harness.evaluate.judges import checked_judge_config

        if not 0.0 <= mixture_coef <= 1.0:
            raise HarnessError(f"{name}: mixture_coef={mixture_coef} must be in [0, 1] (conf/method/{name}.yaml)")
        self.name = name
        self.learning_rate = learning_rate
        self.beta = beta
        self.mixture_coef = mixture_coef
        self.temperature = temperature
        self.judge = checked_judge_config(judge, f"method_params.{name}.judge")
        self.needs_reward = self.judge is None  # the preference is the sweep's reward unless a judge is named

    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """(trained, forward-only) tokens of one prompt visit, in policy-parameter equivalents (module docstring): the
        policy sample trained; both samples generated, the mixture's read by the reference while sampling, the policy
        sample's reference log-probs, and the oracle (both samples × N_reward/N; a judge: the pair in both orders,
        estimated as a policy-sized local judge)."""
        from harness.train.rounds import judged_visit_tokens

        sequence = prompt_tokens + completion_tokens
        oracle = (2 * sequence * sizes.reward_share if self.judge is None
                  else judged_visit_tokens(2, prompt_tokens, completion_tokens))
        return float(sequence), 4.0 * sequence + oracle

    def train(self, job: TrainingJob) -> TrainingOutcome:
        if job.engine == "vllm":
            raise HarnessError(f"{self.name} samples the policy/reference mixture token by token through HF generate: "
                               f"engine=vllm is not supported; use engine=harness")
        from datasets import Dataset
        from harness.inputs.tokenizer_cache import load_tokenizer
        from trl.experimental.online_dpo import OnlineDPOConfig

        from harness.train.oracles import JudgeOracle
        from harness.train.rewards import reward_record, trl_reward_function
        from harness.train.trl_support import finish, peft_config, summed_over_processes, trl_arguments

        if self.judge is None and job.reward is None:
            raise HarnessError(f"{self.name} needs a preference: set reward=<name> (conf/reward/) or "
                               f"+method_params.{self.name}.judge.type=<judge type>")
        budget = job.budget
        tokenizer = load_tokenizer(job.start_checkpoint)
        judge = JudgeOracle(self.judge, job, self.name) if self.judge else None
        reward_function = trl_reward_function(job.reward, tokenizer) if judge is None else judge_only
        config = OnlineDPOConfig(**trl_arguments(job, learning_rate=self.learning_rate), beta=self.beta,
                                 temperature=self.temperature, max_new_tokens=budget.max_completion_tokens,
                                 model_init_kwargs={"dtype": "float32", "device_map": None})
        prompts = Dataset.from_list([{"prompt": row["prompt"]} for row in job.plan.rows])
        trainer = nash_md_trainer_class()(
            model=str(job.start_checkpoint), reward_funcs=reward_function, args=config, train_dataset=prompts,
            processing_class=tokenizer, peft_config=peft_config(job), mixture_coef=self.mixture_coef, judge=judge)
        reward_before = job.reward.tokens_scored if judge is None else 0
        trainer.train()
        oracle_tokens = job.reward.tokens_scored - reward_before if judge is None else judge.judge_tokens
        usage = summed_over_processes(trainer.accelerator, {**trainer.usage, "oracle_tokens": oracle_tokens})
        policy_sample = usage["policy_prompt_tokens"] + usage["policy_completion_tokens"]
        mixture_sample = usage["mixture_prompt_tokens"] + usage["mixture_completion_tokens"]
        parameters = sum(p.numel() for p in trainer.model.parameters())
        oracle_parameters = job.reward.parameters if judge is None else judge.parameters()
        reference_tokens = (policy_sample + 2 * mixture_sample + policy_sample
                            + usage["oracle_tokens"] * oracle_parameters / parameters)
        extra = {"generation_tokens": policy_sample + mixture_sample, "policy_sample_tokens": policy_sample,
                 "mixture_sample_tokens": mixture_sample, "reference_forward_tokens": mixture_sample + policy_sample,
                 "policy_trained_tokens": policy_sample, "completions": 2 * usage["prompts"],
                 "mixture_coef": self.mixture_coef, "policy_parameters": parameters,
                 "flops_accounting": "policy-parameter equivalents (methods/ppo.py)"}
        if judge is None:
            extra.update({"oracle": "reward (Bradley-Terry link)", "reward_tokens": usage["oracle_tokens"],
                          "reward_parameters": job.reward.parameters, "reward": reward_record(job.reward)})
        else:
            extra.update({"oracle": "judge", **judge.record(parameters)})
        outcome = finish(trainer, job, examples=usage["prompts"], pairs=usage["prompts"], policy_tokens=policy_sample,
                         reference_tokens=round(reference_tokens), extra=extra)
        outcome.curves = [entry for entry in trainer.state.log_history if "loss" in entry]
        return outcome


def judge_only(prompts, completions, **_):
    """The reward function slot TRL's trainer requires, unused when a judge gives the preference."""
    raise HarnessError("nash_md: the judge gives the preference; no reward function should be called")


def nash_md_trainer_class():
    """TRL's ``OnlineDPOTrainer`` with Nash-MD-PG's training step (built on first use: TRL imports stay inside)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.online_dpo import OnlineDPOTrainer
    from trl.experimental.utils import truncate_right
    from trl.models.utils import unwrap_model_for_generation

    class ReferenceMixture(LogitsProcessor):
        """Turns the policy's next-token logits into the geometric mixture's, running the reference alongside
        generation with its own key-value cache."""

        def __init__(self, reference_forward, prompt_mask, mixture: float):
            self.forward, self.mask, self.mixture, self.cache = reference_forward, prompt_mask, mixture, None

        def __call__(self, input_ids, scores):
            if self.cache is None:
                ids = input_ids
            else:
                ids = input_ids[:, -1:]
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            output = self.forward(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                                  past_key_values=self.cache, use_cache=True)
            self.cache = output.past_key_values
            return geometric_mixture_logits(scores, output.logits[:, -1, :], self.mixture).to(scores.dtype)

    class NashMDTrainer(OnlineDPOTrainer):
        def __init__(self, *args, mixture_coef: float, judge=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.mixture_coef, self.judge = mixture_coef, judge
            keys = ["score", "kl", "preference", "logps/policy", "val/contain_eos_token", "mixture_coef", "beta"]
            self.stats = {key: [] for key in keys + (["reward", "reward_mixture"] if judge is None else [])}
            self.usage = {"prompts": 0, "policy_prompt_tokens": 0, "policy_completion_tokens": 0,
                          "mixture_prompt_tokens": 0, "mixture_completion_tokens": 0}

        def reference_call(self, model, **inputs):
            if self.ref_model is not None:
                return self.ref_model(**inputs)
            with model.disable_adapter():  # LoRA: the reference is the base model
                return model(**inputs)

        def preference(self, prompts, policy_texts, mixture_texts, policy_ids, mixture_ids):
            """P(y ≻ y') per prompt: σ(r(y) − r(y')) from the reward, or the judge's probability (identical
            texts: ½ without asking)."""
            device = self.accelerator.device
            if self.judge is None:
                completions = [[{"role": "assistant", "content": t}] for t in policy_texts + mixture_texts]
                ids = [row.tolist() for row in torch.cat([policy_ids, mixture_ids])]
                rewards = self._calculate_rewards_from_functions(prompts=2 * prompts, completions=completions,
                                                                 completion_ids_list=ids)
                policy_rewards, mixture_rewards = rewards.split(len(prompts))
                self.stats["reward"].append(policy_rewards.mean().item())
                self.stats["reward_mixture"].append(mixture_rewards.mean().item())
                return torch.sigmoid(policy_rewards - mixture_rewards)
            from harness.train.feedback import conversation_text

            probabilities = [0.5] * len(prompts)
            asked = [i for i in range(len(prompts)) if policy_texts[i] != mixture_texts[i]]
            judgments = self.judge.judge_batch([(conversation_text(prompts[i]), policy_texts[i], mixture_texts[i])
                                                for i in asked])
            for i, judgment in zip(asked, judgments):
                probabilities[i] = judgment.probability
            return torch.tensor(probabilities, dtype=torch.float32, device=device)

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            prompts = inputs["prompt"]
            device = self.accelerator.device
            texts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
            encoded = self.processing_class(text=texts, return_tensors="pt", padding=True, padding_side="left",
                                            add_special_tokens=False)
            prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
            length = prompt_ids.shape[1]
            with unwrap_model_for_generation(model, self.accelerator, generation_kwargs=self.generation_kwargs) as policy, \
                    torch.no_grad():
                policy_output = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                                generation_config=self.generation_config)
                mixture = ReferenceMixture(lambda **kw: self.reference_call(policy, **kw), prompt_mask,
                                           self.mixture_coef)
                mixture_output = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                                 generation_config=self.generation_config,
                                                 logits_processor=LogitsProcessorList([mixture]))
            pad = self.processing_class.pad_token_id
            policy_ids, policy_mask = truncate_right(policy_output[:, length:], self.eos_token_ids, pad)
            mixture_ids, mixture_mask = truncate_right(mixture_output[:, length:], self.eos_token_ids, pad)
            policy_texts = self.processing_class.batch_decode(policy_ids, skip_special_tokens=True)
            mixture_texts = self.processing_class.batch_decode(mixture_ids, skip_special_tokens=True)
            preference = self.preference(prompts, policy_texts, mixture_texts, policy_ids, mixture_ids)

            logps = self._forward(model, prompt_ids, prompt_mask, policy_ids, policy_mask)
            with torch.no_grad():
                if self.ref_model is not None:
                    reference_logps = self._forward(self.ref_model, prompt_ids, prompt_mask, policy_ids, policy_mask)
                else:
                    with model.disable_adapter():
                        reference_logps = self._forward(model, prompt_ids, prompt_mask, policy_ids, policy_mask)
            loss, score, log_ratio = nash_md_loss(logps, reference_logps, policy_mask, preference, self.beta)

            prompt_tokens = int(prompt_mask.sum())
            self.usage["prompts"] += len(prompts)
            self.usage["policy_prompt_tokens"] += prompt_tokens
            self.usage["mixture_prompt_tokens"] += prompt_tokens
            self.usage["policy_completion_tokens"] += int(policy_mask.sum())
            self.usage["mixture_completion_tokens"] += int(mixture_mask.sum())
            eos = torch.isin(policy_ids, torch.tensor(self.eos_token_ids, device=policy_ids.device)).any(-1)
            gather = self.accelerator.gather_for_metrics
            for key, value in (("score", score), ("kl", log_ratio), ("preference", preference),
                               ("logps/policy", (logps * policy_mask).sum(-1)), ("val/contain_eos_token", eos.float())):
                self.stats[key].append(gather(value.detach()).mean().item())
            self.stats["mixture_coef"].append(self.mixture_coef)
            self.stats["beta"].append(self.beta)
            self.accelerator.backward(loss)
            return loss.detach() / self.args.gradient_accumulation_steps

    return NashMDTrainer
