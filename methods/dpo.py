"""DPO — Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), via TRL's DPOTrainer.

Loss (eq. 7):  L = -E[ log σ( β·log πθ(y_w|x)/π_ref(y_w|x) - β·log πθ(y_l|x)/π_ref(y_l|x) ) ]

TRL's ``loss_type`` selects other members of the family with the same trainer (``ipo``,
``hinge``, ``robust``, ...); the ``conf/method`` file of each alias sets it.

The reference log-probs are precomputed once per run (``precompute_ref_log_probs=True``) through
the harness's shared on-disk cache (``harness.train.trl_extensions``): a later run with the same
starting checkpoint, pairs and lengths — any reference-based pair method — reads them instead of
scoring again, and then reports ``reference_tokens = 0`` and ``reference_cache: hit``.

The plain functions below (``pairwise_trainer``, ``pairwise_usage``, ``train_pairwise``) are the
machinery every pair method with its own loss reuses (``methods/rdpo.py``, ``dpop``,
``beta_dpo``, ``npo``, ``sdpo``).
"""

from __future__ import annotations

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.pairwise import train_pairwise


class DPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "dpo", beta: float = 0.1, learning_rate: float = 5e-7,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.name = name
        self.beta = beta
        self.learning_rate = learning_rate
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing


    def train(self, job: TrainingJob) -> TrainingOutcome:
        return train_pairwise(job, beta=self.beta, learning_rate=self.learning_rate,
                              loss_type=[self.loss_type], label_smoothing=self.label_smoothing)


