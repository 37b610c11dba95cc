"""DRO — Direct Reward Optimisation, DRO-V (Richemond et al. 2024, "Offline regularised reinforcement learning for
large language models alignment", arXiv:2405.19107).

Single-trajectory data: (prompt x, response y, scalar feedback r). The policy πθ and a value function V(x) minimise
jointly the mean-squared loss (the paper's DRO objective)

    L(θ, V) = ½·E[ ( r(x, y) − V(x) − τ·log πθ(y|x)/π_ref(y|x) )² ]

whose minimiser is π* ∝ π_ref·exp(r/τ), V* = τ·log Z(x). DRO-V (the paper's Algorithm 1) follows the gradient of L
in V and, for the policy, the gradient of L divided by τ (``dro_losses``: −log πθ·(r − V) + τ/2·(log πθ/π_ref)², V
held fixed; the same direction, a τ-free step size). The paper's V is a separate network; here V(x) is a linear head
(initialised to 0) on the policy's last hidden state at the prompt's last token, that state detached, so the value
loss trains the head only and never the policy (θ and V stay separate parameters, as in the paper, at the cost of
one linear layer instead of a second model; the head is not saved). It has its own learning rate
(``value_learning_rate``), as the paper's two parameter sets do.

Data: the ``unpaired`` view — ``format: binary`` rows as they come, or each preference pair split as KTO splits it
(chosen → desirable, rejected → undesirable); r = ``desirable_reward`` / ``undesirable_reward`` (1 / −1 by default:
the paper's rewards are normalised to mean 0, variance 1 over the data set, §4, which ±1 is for balanced feedback).
Budget: as KTO, P pairs = 2·P examples in batches twice as large, so DRO takes DPO's optimizer steps over the same
pairs. Tokens / FLOPs: the policy trains every example's sequence; the reference scores each once (forward-only,
``forward_only_ratio`` 1); the value head's cost (one hidden_size × 1 product) is not counted.
"""

from __future__ import annotations

import torch

from harness.errors import HarnessError
from harness.protocols import TrainingJob, TrainingOutcome


def dro_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, values: torch.Tensor, rewards: torch.Tensor,
             *, tau: float) -> torch.Tensor:
    """Per-example DRO objective ½·(r − V(x) − τ·(log πθ(y|x) − log π_ref(y|x)))² (Richemond et al. 2024, the
    squared loss of Sec. 4; log-probs summed over the completion)."""
    return 0.5 * (rewards - values - tau * (policy_logps - reference_logps)) ** 2


def dro_losses(policy_logps: torch.Tensor, reference_logps: torch.Tensor, values: torch.Tensor,
               rewards: torch.Tensor, *, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (policy loss, value loss) of DRO-V (the paper's Algorithm 1), whose gradients are
    ∂L/∂θ / τ and ∂L/∂V of ``dro_loss``:

        policy: −log πθ(y|x)·sg(r − V(x)) + τ/2·(log πθ(y|x)/π_ref(y|x))²
        value:  ½·(r − V(x) − τ·sg(log πθ(y|x)/π_ref(y|x)))²

    (sg = stop-gradient). Departure: none in the loss; the value function's form is the adapter's (module docstring).
    """
    log_ratio = policy_logps - reference_logps
    policy = -policy_logps * (rewards - values).detach() + 0.5 * tau * log_ratio ** 2
    value = 0.5 * (rewards - values - tau * log_ratio.detach()) ** 2
    return policy, value


class DRO:
    data_view = "unpaired"
    reference_based = True
    forward_only_ratio = 1.0   # the reference scores each trained sequence once

    def __init__(self, name: str = "dro", tau: float = 1.0, learning_rate: float = 5e-7,
                 value_learning_rate: float = 1e-4, desirable_reward: float = 1.0, undesirable_reward: float = -1.0):
        if tau <= 0:
            raise HarnessError(f"{name}: tau={tau} must be > 0 (conf/method/dro.yaml)")
        if desirable_reward <= undesirable_reward:
            raise HarnessError(f"{name}: desirable_reward={desirable_reward} must exceed undesirable_reward="
                               f"{undesirable_reward} (conf/method/dro.yaml)")
        self.name = name
        self.tau = tau
        self.learning_rate = learning_rate
        self.value_learning_rate = value_learning_rate
        self.desirable_reward = desirable_reward
        self.undesirable_reward = undesirable_reward

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from transformers import AutoConfig

        from harness.train.sequence_loop import SequenceLoop, encode

        rows = job.plan.rows
        hidden = AutoConfig.from_pretrained(job.start_checkpoint).get_text_config().hidden_size
        value_head = torch.nn.Linear(hidden, 1)  # V(x), starting at 0
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        loop = SequenceLoop(job, self.learning_rate, extra_modules=[value_head],
                            extra_learning_rate=self.value_learning_rate)
        sequences = [encode(loop.tokenizer, row["prompt"], row["completion"], job.plan.max_length) for row in rows]
        rewards = [self.desirable_reward if row["label"] else self.undesirable_reward for row in rows]
        reference = loop.reference_logps(sequences, job.plan.micro_batch)
        lengths = [len(p) + len(c) for p, c in sequences]
        curves, trained, examples = [], 0, 0
        steps = loop.steps()
        for number, step in enumerate(steps, start=1):
            size = sum(len(micro) for micro in step)
            totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "value": 0.0, "log_ratio": 0.0}
            for micro in step:
                logps, states = loop.logps(loop.policy, [sequences[i] for i in micro], prompt_states=True)
                values = value_head(states.detach()).squeeze(-1)
                reward = torch.tensor([rewards[i] for i in micro], device=loop.device)
                ref = torch.tensor([reference[i] for i in micro], device=loop.device)
                policy_loss, value_loss = dro_losses(logps, ref, values, reward, tau=self.tau)
                loop.backward((policy_loss + value_loss).mean(), len(micro) / size)
                with torch.no_grad():
                    share = len(micro) / size
                    totals["loss"] += float(dro_loss(logps, ref, values, reward, tau=self.tau).mean()) * share
                    totals["policy_loss"] += float(policy_loss.mean()) * share
                    totals["value_loss"] += float(value_loss.mean()) * share
                    totals["value"] += float(values.mean()) * share
                    totals["log_ratio"] += float((logps - ref).mean()) * share
                trained += sum(lengths[i] for i in micro)
                examples += len(micro)
            rate = loop.step()
            curves.append({"step": number, "learning_rate": rate, **totals})
        return loop.finish(steps=len(steps), examples=examples, pairs=examples / 2, policy_tokens=trained,
                           reference_tokens=sum(lengths), curves=curves,
                           extra={"dro_rewards": {"desirable": self.desirable_reward,
                                                  "undesirable": self.undesirable_reward},
                                  "desirable_examples": sum(1 for row in rows if row["label"]),
                                  "undesirable_examples": sum(1 for row in rows if not row["label"]),
                                  "value_function": "linear head on the policy's detached last prompt state"})
