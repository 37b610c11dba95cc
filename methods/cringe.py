"""CRINGE — the ContRastive Iterative Negative GEneration loss (Adolphs, Gao, Xu, Shuster, Sukhbaatar & Weston 2022,
"The CRINGE Loss: Learning what language not to model", arXiv:2211.05826), in the pairwise form of Xu, Lee,
Sukhbaatar & Weston 2023 ("Some things are more CRINGE than others: Iterative preference optimization with the
pairwise cringe loss", arXiv:2312.16682).

**CRINGE, token level** (Adolphs et al., Sec. 3). For each token y⁻_t of a negative sequence, a positive token s⁺ is
drawn from the model's own top-k prediction at that position (sampled ∝ softmax of the top-k logits) and contrasted
with the negative one by a softmax over the two logits:

    L_Cr(x, y⁻) = −Σ_t log( exp(s⁺_t) / (exp(s⁺_t) + exp(s⁻_t)) ) = Σ_t log(1 + exp(s⁻_t − s⁺_t)),

s the logits (scores) of the two tokens; positive sequences train by maximum likelihood, L_CE.

**Pairwise CRINGE** (Xu et al., Sec. 2). The chosen response is the positive, the rejected one the negative, and the
CRINGE term is gated by the pair's margin M = log πθ(y_w|x) − log πθ(y_l|x) (sequence log-likelihoods):

    L_Pair = L_CE(x, y_w) + α·g·L_Cr(x, y_l),   g = σ((b − M)/τ)

so a pair the model already orders by more than the gate b is left alone (g → 0) and a pair below it is pushed apart.

Choices and departures, stated:

* The negative token itself is left out of the top-k candidates (the contrast of a token with itself has no
  gradient); the k candidates are the k highest logits among the other tokens.
* Losses are means over each completion's tokens (L_CE and L_Cr per token), as cross-entropy training averages them;
  the margin M uses summed sequence log-likelihoods.
* The gate g is a weight without gradient (computed from detached log-likelihoods): it switches the CRINGE term on
  or off, it is not itself a training signal.
* Positive draws use a generator seeded with the run's seed, so runs are reproducible.
* k, b, τ, α: see ``conf/method/cringe.yaml`` (k = 1 and α = 1 from the authors' ParlAI code,
  ``projects/cringe/cringe_loss.py``, whose token loss this matches: the positive is drawn from the top k predictions
  with the negative token masked out; b and τ as we recall Xu et al.); the section numbers above are as we recall
  the two papers, not re-checked offline.
* One offline pass over the data; the papers' iterations (new generations labelled by a reward model between
  rounds) are not part of this method (``iterative_dpo``'s loop is the harness's way to iterate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.token_batch import TokenBatch, token_logps


def sample_positive_tokens(logits: torch.Tensor, negative_tokens: torch.Tensor, k: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """One positive token per position: drawn ∝ softmax over the k highest logits other than the negative token's."""
    scores = logits.detach().float().clone()
    scores.scatter_(-1, negative_tokens.unsqueeze(-1), float("-inf"))
    top_logits, top_tokens = scores.topk(min(k, scores.size(-1) - 1), dim=-1)
    draws = torch.multinomial(torch.softmax(top_logits, dim=-1).cpu(), 1, generator=generator).to(top_tokens.device)
    return top_tokens.gather(-1, draws).squeeze(-1)


def cringe_token_loss(logits: torch.Tensor, negative_tokens: torch.Tensor,
                      positive_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token CRINGE loss: −log(e^{s⁺}/(e^{s⁺} + e^{s⁻})) = softplus(s⁻ − s⁺), s the logits of the two tokens."""
    positive = logits.gather(-1, positive_tokens.unsqueeze(-1)).squeeze(-1)
    negative = logits.gather(-1, negative_tokens.unsqueeze(-1)).squeeze(-1)
    return F.softplus(negative - positive)


def margin_gate(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, bias: float,
                temperature: float) -> torch.Tensor:
    """g = σ((b − M)/τ), M = log πθ(y_w|x) − log πθ(y_l|x); no gradient."""
    return torch.sigmoid((bias - (chosen_logps - rejected_logps).detach()) / temperature)


def pairwise_cringe_loss(chosen_nll: torch.Tensor, rejected_cringe: torch.Tensor, gate: torch.Tensor, *,
                         alpha: float) -> torch.Tensor:
    """Per-pair loss L_CE(y_w) + α·g·L_Cr(y_l) (Xu et al. 2023's pairwise cringe loss)."""
    return chosen_nll + alpha * gate * rejected_cringe


class CringeLoss:
    """The token loss ``harness.train.token_level`` trains with: MLE on the chosen tokens, CRINGE on the rejected
    tokens against sampled top-k positives, gated by the pair's margin. Reference-free."""

    reference_logits = False
    reference_based = False

    def __init__(self, *, top_k: int, alpha: float, gate_bias: float, gate_temperature: float, seed: int = 0):
        self.top_k, self.alpha = top_k, alpha
        self.gate_bias, self.gate_temperature = gate_bias, gate_temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics: dict[str, float] = {}

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        logps = token_logps(batch.logits, batch.labels)
        rejected = batch.sequence >= batch.pairs
        positives = batch.labels.clone()
        positives[rejected] = sample_positive_tokens(batch.logits[rejected], batch.labels[rejected], self.top_k,
                                                     self.generator)
        cringe = torch.where(rejected, cringe_token_loss(batch.logits, batch.labels, positives), torch.zeros_like(logps))
        lengths = batch.sequence_lengths().clamp(min=1.0)
        chosen_logps, rejected_logps = batch.sequence_sums(logps).chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        chosen_nll = -chosen_logps / chosen_lengths
        rejected_cringe = batch.sequence_sums(cringe)[batch.pairs:] / rejected_lengths
        gate = margin_gate(chosen_logps, rejected_logps, bias=self.gate_bias, temperature=self.gate_temperature)
        self.metrics = {"cringe/gate": gate.mean().item(), "cringe/chosen_nll": chosen_nll.mean().item(),
                        "cringe/rejected_cringe": rejected_cringe.mean().item()}
        return pairwise_cringe_loss(chosen_nll, rejected_cringe, gate, alpha=self.alpha)


class Cringe:
    data_view = "pairs"
    reference_based = False

    def __init__(self, name: str = "cringe", top_k: int = 1, alpha: float = 1.0, gate_bias: float = -10.0,
                 gate_temperature: float = 1.0, learning_rate: float = 1e-6):
        self.name = name
        self.top_k = top_k
        self.alpha = alpha
        self.gate_bias = gate_bias
        self.gate_temperature = gate_temperature
        self.learning_rate = learning_rate

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from harness.train.token_level import train_token_level

        loss = CringeLoss(top_k=self.top_k, alpha=self.alpha, gate_bias=self.gate_bias,
                          gate_temperature=self.gate_temperature, seed=job.seed)
        return train_token_level(job, beta=1.0, learning_rate=self.learning_rate, token_loss=loss)
