"""sDPO — stepwise DPO (Kim, Kim, Park, Lee, Song, Kim, Lee, Kim & Park 2024, "sDPO: Don't Use Your
Data All at Once", arXiv:2403.19270).

The preference data is split into k chunks D_1..D_k used one after another. Step t trains DPO
(Rafailov et al. 2023, eq. 7) on D_t with the *previous step's aligned model* as both the policy's
initialisation and the reference (Sec. 2, the stepwise objective):

    π_ref,1 = π_start,   π_ref,t = π_θ,t−1,
    L_t = −E_{D_t}[ log σ( β·log π_θ,t(y_w|x)/π_ref,t(y_w|x) − β·log π_θ,t(y_l|x)/π_ref,t(y_l|x) ) ]

so later steps are referenced to a more aligned model, a tighter lower bound on what the policy
must beat. The paper uses k = 2 (its two data sets, OpenOrca then Ultrafeedback Cleaned).

Matched budget: the chunks are consecutive runs of the budget's pairs, cut at optimizer-batch
boundaries (``split_at_batches``), and every chunk trains for ``budget.epochs`` epochs, so sDPO
takes exactly DPO's optimizer steps over exactly DPO's pairs. When the budget has fewer batches
than ``chunks`` (e.g. ``budget=micro``: 4 pairs in one batch of 4) the number of steps wins: it
trains fewer chunks, and the record says how many (``sdpo_chunks``). Pairs keep the budget's
order; the paper instead orders its chunks easy → hard (by data set); a difficulty ordering by the
reference's margin would need a scoring pass before training and is left out.

Learning-rate schedule: each step is its own DPO run, as in the paper, so the schedule (and its
warm-up) and the optimizer state restart per chunk.

Reference scoring: each chunk's reference log-probs are precomputed with the model that starts
the chunk. The first chunk's reference is the starting checkpoint and goes through the shared
cache like DPO's; later references are this run's own intermediate models, whose entries never
hit again (``reference_cache_chunks`` records each chunk's status; ``reference_cache`` is ``hit``
only when all hit).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace

from harness.protocols import TrainingJob, TrainingOutcome
from harness.train.trl_support import finish, save_gathered
from harness.train.pairwise import pairwise_trainer, pairwise_usage

log = logging.getLogger("harness")


def split_at_batches(rows: list, chunks: int, batch_pairs: int) -> list[list]:
    """Consecutive chunks of ``rows`` holding whole optimizer batches (the last may hold a partial
    one), as equal as possible; at most one chunk per batch."""
    batches = -(-len(rows) // batch_pairs)
    chunks = max(1, min(chunks, batches))
    out, start = [], 0
    for index in range(chunks):
        size = batches // chunks + (1 if index < batches % chunks else 0)
        end = min(start + size * batch_pairs, len(rows))
        out.append(rows[start:end])
        start = end
    return out


def save_policy(trainer, folder) -> None:
    if trainer.accelerator.num_processes > 1:  # harness.run.launch: rank 0 saves the gathered weights, all wait
        save_gathered(trainer, folder)
        return
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)


class SDPO:
    data_view = "pairs"
    reference_based = True

    def __init__(self, name: str = "sdpo", chunks: int = 2, beta: float = 0.1, learning_rate: float = 5e-7):
        self.name = name
        self.chunks = chunks
        self.beta = beta
        self.learning_rate = learning_rate


    def train(self, job: TrainingJob) -> TrainingOutcome:
        chunks = split_at_batches(job.plan.rows, self.chunks, job.budget.batch_pairs)
        if len(chunks) < self.chunks:
            log.warning("  sdpo: %d optimizer batches fit only %d of %d chunks", len(chunks), len(chunks), self.chunks)
        start, steps, curves, statuses = job.start_checkpoint, 0, [], []
        totals = {"examples": 0, "pairs": 0.0, "policy_tokens": 0, "reference_tokens": 0}
        seconds = 0.0
        for index, rows in enumerate(chunks, start=1):
            chunk_job = replace(job, plan=job.plan.for_rows(rows))  # the chunk's own steps and schedule
            trainer = pairwise_trainer(chunk_job, start=start, beta=self.beta, learning_rate=self.learning_rate)
            trainer.train()
            usage = pairwise_usage(trainer, chunk_job)
            for key in totals:
                totals[key] += usage[key]
            statuses.append(usage["extra"]["reference_cache"])
            seconds += usage["extra"]["reference_seconds"]
            curves += [{**entry, "chunk": index} for entry in trainer.state.log_history
                       if "loss" in entry or "train_loss" in entry]
            steps += trainer.state.global_step
            if index < len(chunks):
                start = job.scratch_dir / f"chunk-{index}"
                save_policy(trainer, start)
                del trainer
                gc.collect()
        extra = {"sdpo_chunks": len(chunks), "sdpo_chunk_pairs": [len(rows) for rows in chunks],
                 "reference_cache": "hit" if all(s == "hit" for s in statuses) else "miss",
                 "reference_cache_chunks": statuses, "reference_seconds": round(seconds, 3)}
        outcome = finish(trainer, job, **totals, extra=extra)  # saves the last chunk's policy, clears scratch
        outcome.optimizer_steps, outcome.curves = steps, curves
        return outcome
