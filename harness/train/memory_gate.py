"""At most one memory-heavy training at a time on a machine: ``training_slot``.

Fanned-out jobs on one machine (``fanout=true hydra/launcher=workers``) share its memory. Two PPO runs side by side
do not fit a 24 GiB machine: each holds a trained policy and value model and a frozen reference and reward model,
13.3 GB at peak measured alone on Gemma 3 270M, ~10.5 GB on SmolLM2-135M. A training whose estimated footprint
exceeds a fifth of the machine's memory therefore holds an ``fcntl`` lock, ``.heavy-training-<host>.lock`` in the
cache, while it trains; a second such training on the same machine waits for it (and says so) rather than both
swapping or being killed. Lighter trainings never wait, and a training on a GPU is not gated (its memory is the
device's).

The estimate (``training_bytes``) is ours, no library offers one: 16 bytes per trained parameter (fp32 weights,
gradient, two AdamW moments) and 4 per frozen parameter (fp32 weights), with a method's ``memory_models`` = (trained,
frozen) models of the policy's size. Unless a method says otherwise that is (1, 0) — the pairwise methods' reference
log-probs are computed once and cached, no reference model stays loaded — or (1, 2) for a method that needs a reward
(reference and reward model); PPO says (2, 2). The estimate leaves out activations, logits and the process itself
(measured peaks run 1.3-2x above it), hence the fifth: PPO on either embedded family is heavy (5.4 and 10.7 GB
estimated on 25.3 GB), DPO on Gemma (4.3 GB) is not.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("harness")

TRAINED_BYTES, FROZEN_BYTES = 16, 4
HEAVY_SHARE = 1 / 5


def training_bytes(method, policy_parameters: int) -> int:
    """Estimated memory of training ``method`` on a policy of ``policy_parameters`` (module docstring)."""
    default = (1, 2) if getattr(method, "needs_reward", False) else (1, 0)
    trained, frozen = getattr(method, "memory_models", default)
    return policy_parameters * (trained * TRAINED_BYTES + frozen * FROZEN_BYTES)


def machine_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


@contextmanager
def training_slot(method, policy_parameters: int, lock_dir: Path, device: str, *, total: int | None = None):
    """The block runs alone among heavy trainings on this machine when ``method`` on this policy is heavy (module
    docstring); otherwise, or on a GPU, it runs at once."""
    need = training_bytes(method, policy_parameters)
    total = machine_bytes() if total is None else total
    if not str(device).startswith("cpu") or need <= total * HEAVY_SHARE:
        yield
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f".heavy-training-{socket.gethostname()}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            began = time.perf_counter()
            log.info("  waiting for another heavy training on this machine to finish (~%.1f GB estimated here, %.1f GB "
                     "memory)", need / 1e9, total / 1e9)
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("  waited %.0f s", time.perf_counter() - began)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def release_memory() -> None:
    """Hand freed memory back to the system after a unit of work: a worker process that runs unit after unit
    (joblib's) otherwise keeps its largest unit's heap (glibc serves tensors below its 32 MB mmap threshold from
    arenas it does not shrink by itself), and the next heavy training beside it runs short. ``malloc_trim`` is glibc's;
    elsewhere only the garbage collector runs."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass
