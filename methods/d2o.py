"""D2O — Distributional Dispreference Optimization (Duan et al. 2024, "Negating negatives: alignment without human
positive samples via distributional dispreference optimization", arXiv:2403.03419).

Learns from negative responses alone: the human-labelled dispreferred y_l of each prompt is pushed below the
*distribution* of the model's own responses, K samples y_1..y_K drawn from the reference, which anchor the policy
instead of (noisy) human positives. The loss (the paper's D2O objective):

    L = −E[ log σ( (β/K)·Σ_k log πθ(y_k|x)/π_ref(y_k|x) − α·log πθ(y_l|x)/π_ref(y_l|x) ) ],  y_k ~ π_ref(·|x)

— a DPO whose preferred side is the average log-ratio over the K samples (a distributional preference), with its
own temperature α on the negative.

Here: the negatives are the rejected responses of the pairs (the chosen ones are never read); the K samples of each
pair's prompt are drawn once, before training, from the starting checkpoint (temperature ``temperature``, no top-k:
samples of π_ref itself), which is also the reference of both terms. **Departures**: the paper distinguishes the
reference of the samples from that of the negatives and refreshes the samples' reference (and samples) as training
goes; here both are the fixed start and the samples offline — the single-reference, offline-sampling form (a
reading note of the paper we could read, §3.2, says its experiments set both references to the starting Alpaca model).

**Budget**: one pair visit = one negative and its K samples; D2O takes DPO's optimizer steps over the budget's pairs
(``budget.match=examples``). **Tokens / FLOPs**, in policy-parameter equivalents as the online methods count them
(``methods/rso.py``): trained, the K + 1 sequences of each visit; forward-only, the reference's pass over them and the
generation of the K samples (prompt + completion of each, re-tokenized: ``generation_tokens`` in the record).
``visit_cost`` prices a visit the same way for ``budget.match=tokens|flops``, completions at the budget's cap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


def d2o_loss(sample_logps: torch.Tensor, sample_reference_logps: torch.Tensor, rejected_logps: torch.Tensor,
             rejected_reference_logps: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Per-negative D2O loss −log σ((β/K)·Σ_k log πθ(y_k)/π_ref(y_k) − α·log πθ(y_l)/π_ref(y_l)) (Duan et al. 2024,
    the D2O objective). ``sample_*``: (batch, K) summed log-probs of the self-generated samples; ``rejected_*``:
    (batch,). Departure: one reference for both terms (module docstring)."""
    positive = beta * (sample_logps - sample_reference_logps).mean(dim=-1)
    negative = alpha * (rejected_logps - rejected_reference_logps)
    return -F.logsigmoid(positive - negative)


class D2O:
    data_view = "pairs"        # the rejected side only
    reference_based = True

    def __init__(self, name: str = "d2o", beta: float = 0.1, alpha: float = 0.1, samples: int = 11,
                 temperature: float = 1.0, learning_rate: float = 5e-7):
        if samples < 1:
            raise HarnessError(f"{name}: samples={samples} must be at least 1 per negative (conf/method/d2o.yaml)")
        if beta <= 0 or alpha <= 0 or temperature <= 0:
            raise HarnessError(f"{name}: beta={beta}, alpha={alpha} and temperature={temperature} must be > 0 "
                               f"(conf/method/d2o.yaml)")
        self.name = name
        self.beta = beta
        self.alpha = alpha
        self.samples = samples
        self.temperature = temperature
        self.learning_rate = learning_rate

    # cost model for budget.match=tokens|flops (harness.train.matching), in policy-parameter equivalents
    def visit_cost(self, prompt_tokens: int, completion_tokens: int, budget, sizes) -> tuple[float, float]:
        """One negative: K + 1 sequences trained and scored by the reference, K sequences generated."""
        sequence = prompt_tokens + completion_tokens
        trained = (self.samples + 1) * sequence
        return float(trained), float(trained + self.samples * sequence)

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.rounds import Sampler
        from harness.train.sequence_loop import SequenceLoop, encode

        rows, plan = job.plan.rows, job.plan
        sampler = Sampler(plan, self.temperature, None, engine=job.engine)
        generated = sampler.samples(job.start_checkpoint, [row["prompt"] for row in rows], self.samples,
                                    seed=1000 * job.seed)
        loop = SequenceLoop(job, self.learning_rate)
        negatives = [encode(loop.tokenizer, row["prompt"], row["rejected"], plan.max_length) for row in rows]
        samples = [[encode(loop.tokenizer, row["prompt"], text, plan.max_length) for text in texts]
                   for row, texts in zip(rows, generated)]
        flat = [sequence for group in samples for sequence in group]
        negative_reference = loop.reference_logps(negatives, plan.sequence_batch)
        flat_reference = loop.reference_logps(flat, plan.sequence_batch)
        sample_reference = [flat_reference[i * self.samples: (i + 1) * self.samples] for i in range(len(rows))]
        size = [sum(len(p) + len(c) for p, c in [negative] + group) for negative, group in zip(negatives, samples)]
        curves, trained, examples = [], 0, 0
        steps = loop.steps()
        for number, step in enumerate(steps, start=1):
            count = sum(len(micro) for micro in step)
            totals = {"loss": 0.0, "samples_log_ratio": 0.0, "rejected_log_ratio": 0.0}
            for micro in step:
                sequences = [negatives[i] for i in micro] + [s for i in micro for s in samples[i]]
                logps, _ = loop.logps(loop.policy, sequences)
                rejected, sampled = logps[: len(micro)], logps[len(micro):].view(len(micro), self.samples)
                rejected_ref = torch.tensor([negative_reference[i] for i in micro], device=loop.device)
                sampled_ref = torch.tensor([sample_reference[i] for i in micro], device=loop.device)
                loss = d2o_loss(sampled, sampled_ref, rejected, rejected_ref, beta=self.beta, alpha=self.alpha)
                loop.backward(loss.mean(), len(micro) / count)
                with torch.no_grad():
                    share = len(micro) / count
                    totals["loss"] += float(loss.mean()) * share
                    totals["samples_log_ratio"] += float((sampled - sampled_ref).mean()) * share
                    totals["rejected_log_ratio"] += float((rejected - rejected_ref).mean()) * share
                trained += sum(size[i] for i in micro)
                examples += len(micro)
            rate = loop.step()
            curves.append({"step": number, "learning_rate": rate, **totals})
        return loop.finish(steps=len(steps), examples=examples, pairs=float(examples), policy_tokens=trained,
                           reference_tokens=sum(size) + sampler.tokens, curves=curves,
                           extra={"samples_per_negative": self.samples, "generation_tokens": sampler.tokens,
                                  "reference_scored_tokens": sum(size),
                                  "flops_accounting": "policy-parameter equivalents (methods/ppo.py)"})
