"""A small own training loop over summed completion log-probs, for losses no TRL trainer can host: a learned value
function beside the policy (``methods/dro.py``), K self-generated samples inside one loss term (``methods/d2o.py``).

It reads the job's plan as the TRL methods do through ``trl_arguments``: the plan's rows, passes, optimizer steps,
micro-batch and accumulation, warm-up, length cap and precision (bf16 / fp16 autocast), and the budget's optimizer
(AdamW, as every budget names), schedule, decay, clipping and LoRA. Rows are shuffled per pass with the budget's seed.
Sequences are rendered as TRL and the held-out scorer render them (``harness.evaluate.logprobs.render``: the prompt
through the chat template, the completion as the assistant turn) and cut to ``plan.max_length`` (completion end
first). Dropout is off, as in TRL's preference trainers. One process only: a multi-process launch is refused.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from dataclasses import dataclass, field

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


def encode(tokenizer, prompt: list[dict], completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as a chat model sees them, cut to ``max_length`` tokens: the completion loses its
    end first, keeping at least one token, then the prompt its oldest tokens."""
    from harness.evaluate.logprobs import render

    prompt_ids, completion_ids = render(tokenizer, prompt, completion)
    if not completion_ids:
        completion_ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    completion_ids = completion_ids[: max(max_length - len(prompt_ids), 1)]
    prompt_ids = prompt_ids[max(len(prompt_ids) + len(completion_ids) - max_length, 0):]
    return prompt_ids, completion_ids


def sequence_logps(model, sequences: list[tuple[list[int], list[int]]], *, pad_id: int, device: str,
                   prompt_states: bool = False):
    """Summed log-probs of each completion given its prompt (a tensor with gradients, float32), and with
    ``prompt_states`` the last layer's hidden state at each prompt's last token (what a value head reads)."""
    import torch

    lengths = [len(p) + len(c) for p, c in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width - 1), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(sequences):
        ids[row, : lengths[row]] = torch.tensor(prompt + completion)
        attention[row, : lengths[row]] = 1
        scored[row, max(len(prompt) - 1, 0): lengths[row] - 1] = 1.0  # position t predicts token t + 1
    ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
    # the LM head projects only the positions from the shortest prompt's last token on (logits_to_keep): the
    # vocabulary-wide projection of prompt positions nobody scores is skipped, as TRL's compact head does
    first = max(min(len(p) for p, _ in sequences) - 1, 0)
    keep = torch.arange(first, width - 1, device=device)
    output = model(input_ids=ids, attention_mask=attention, output_hidden_states=prompt_states, logits_to_keep=keep)
    logps = torch.log_softmax(output.logits.float(), dim=-1).gather(-1, ids[:, first + 1:, None]).squeeze(-1)
    sums = (logps * scored[:, first:]).sum(-1)
    if not prompt_states:
        return sums, None
    last = torch.tensor([max(len(p) - 1, 0) for p, _ in sequences], device=device)
    return sums, output.hidden_states[-1][torch.arange(len(sequences), device=device), last].float()


def autocast_for(precision: str, device: str):
    """A context factory: ``torch.autocast`` in the plan's bf16 / fp16, a no-op in fp32."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device, dtype=dtype)


@dataclass
class SequenceLoop:
    """The policy (LoRA when the budget says), its frozen reference, tokenizer, optimizer and schedule of one job.

    ``extra_modules`` (e.g. a value head) train beside the policy at ``extra_learning_rate``; they are not saved."""

    job: TrainingJob
    learning_rate: float
    extra_modules: list = field(default_factory=list)
    extra_learning_rate: float | None = None
    with_reference: bool = True

    def __post_init__(self):
        import torch
        from transformers import AutoModelForCausalLM, get_scheduler
        from harness.inputs.tokenizer_cache import load_tokenizer

        from harness.train.trl_support import model_init_kwargs, peft_config

        plan, budget = self.job.plan, self.job.budget
        if plan.world_size > 1:
            raise HarnessError("this method trains in one process (harness.train.sequence_loop); run it without "
                               "launch.processes")
        if not budget.optimizer.startswith("adamw"):
            raise HarnessError(f"budget.optimizer={budget.optimizer}: this method's own loop runs AdamW only; use an "
                               f"adamw_* optimizer")
        torch.manual_seed(budget.seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = autocast_for(plan.precision, self.device)
        self.tokenizer = load_tokenizer(self.job.start_checkpoint)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        load = dict(dtype=torch.float32, **(model_init_kwargs(self.job) or {}))
        self.policy = AutoModelForCausalLM.from_pretrained(self.job.start_checkpoint, **load).to(self.device)
        _no_dropout(self.policy)
        lora = peft_config(self.job)
        if lora is not None:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, lora)
        self.reference = None
        if self.with_reference:
            self.reference = AutoModelForCausalLM.from_pretrained(self.job.start_checkpoint, **load).to(self.device)
            self.reference.requires_grad_(False).eval()
        for module in self.extra_modules:
            module.to(self.device)
        self.parameters = [p for p in self.policy.parameters() if p.requires_grad]
        extra = [p for module in self.extra_modules for p in module.parameters()]
        groups = [{"params": self.parameters, "lr": self.learning_rate}]
        if extra:
            groups.append({"params": extra, "lr": self.extra_learning_rate or self.learning_rate})
        self.trainable = self.parameters + extra
        self.optimizer = torch.optim.AdamW(groups, weight_decay=budget.weight_decay,
                                           fused=True if budget.optimizer.endswith("_fused") else None)
        self.scheduler = get_scheduler(budget.lr_scheduler, self.optimizer, num_warmup_steps=plan.warmup_steps,
                                       num_training_steps=plan.optimizer_steps)
        self.scaler = torch.amp.GradScaler(self.device, enabled=plan.precision == "fp16")

    def steps(self) -> list[list[list[int]]]:
        """Row indices of every optimizer step, as its micro-batches: the plan's passes over its rows (each pass
        shuffled with the budget's seed), cut into steps of micro-batch × accumulation rows, up to the plan's steps."""
        plan = self.job.plan
        order_source = random.Random(self.job.budget.seed)
        per_step = plan.micro_batch * plan.gradient_accumulation
        out = []
        for _ in range(plan.epochs):
            order = list(range(len(plan.rows)))
            order_source.shuffle(order)
            for start in range(0, len(order), per_step):
                step = order[start: start + per_step]
                out.append([step[i: i + plan.micro_batch] for i in range(0, len(step), plan.micro_batch)])
        return out[: plan.optimizer_steps]

    def logps(self, model, sequences, *, prompt_states: bool = False):
        with self.autocast():
            return sequence_logps(model, sequences, pad_id=self.pad_id, device=self.device,
                                  prompt_states=prompt_states)

    def reference_logps(self, sequences, batch_size: int) -> list[float]:
        """The frozen reference's summed completion log-probs, without gradients, in batches of ``batch_size``."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                out += self.logps(self.reference, sequences[start: start + batch_size])[0].tolist()
        return out

    def backward(self, loss, share: float) -> None:
        """Accumulate ``loss`` × ``share`` (a micro-batch's share of its optimizer step)."""
        self.scaler.scale(loss * share).backward()

    def step(self) -> float:
        """One optimizer step (gradients clipped to the budget's norm); returns the learning rate it used."""
        import torch

        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.job.budget.max_grad_norm)
        rate = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return rate

    def finish(self, *, steps: int, examples: int, pairs: float, policy_tokens: int, reference_tokens: int,
               curves: list[dict], extra: dict) -> TrainingOutcome:
        """Save the policy (LoRA merged) and tokenizer into the job's output folder, clear scratch, report."""
        policy = self.policy.merge_and_unload() if hasattr(self.policy, "merge_and_unload") else self.policy
        policy.save_pretrained(self.job.output_dir)
        self.tokenizer.save_pretrained(self.job.output_dir)
        shutil.rmtree(self.job.scratch_dir, ignore_errors=True)
        return TrainingOutcome(optimizer_steps=steps, examples=examples, pairs=pairs, policy_tokens=policy_tokens,
                               reference_tokens=reference_tokens, curves=curves,
                               extra={"precision": self.job.plan.precision, **extra})


def _no_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
