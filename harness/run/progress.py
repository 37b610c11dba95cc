"""Progress the sweep shows: its own lines, and a heartbeat that never lets a long stage go quiet.

* ``Heartbeat.stage(what)`` marks what is running; while a stage runs, a background thread logs
  ``  … <what>: <how far>, <elapsed> elapsed`` every ``interval`` seconds (``heartbeat_seconds``, default 30).
  *How far* is read from the progress bars the libraries keep (transformers' trainer, lm-eval's log-likelihood and
  generation loops, datasets, our own generation and judging loops): every ``tqdm`` bar registers itself in
  ``tqdm.std.tqdm._instances``, so the heartbeat shows the most recently updated one as ``<desc> <n>/<total>``.
* ``quiet_progress_bars()`` keeps the libraries' bars out of the sweep's output: each bar still counts (so the
  heartbeat can read it) but draws to ``os.devnull``, and the trainer's per-step log dictionaries are dropped (the
  same numbers are in the run's ``curves/``). ``progress_bars=true`` shows them instead.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("harness")


class Heartbeat:
    """Logs what is running, how far it got and for how long, every ``interval`` seconds while a stage runs."""

    def __init__(self, interval: float = 30.0, logger: logging.Logger = log):
        self.interval, self.logger = float(interval), logger
        self._stage: str | None = None
        self._started = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def stage(self, what: str):
        """Mark ``what`` as running for the block (stages nest: the inner one is reported, then the outer again)."""
        with self._lock:
            outer = (self._stage, self._started)
            self._stage, self._started = what, time.monotonic()
        self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                self._stage, self._started = outer

    def beat(self) -> str | None:
        """The heartbeat line for now (None when nothing runs)."""
        with self._lock:
            stage, started = self._stage, self._started
        if stage is None:
            return None
        bar = busiest_bar()
        return f"  … {stage}: {bar + ', ' if bar else ''}{format_seconds(time.monotonic() - started)} elapsed"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _ensure_thread(self) -> None:
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="harness-heartbeat", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            line = self.beat()
            if line:
                self.logger.info(line)


def busiest_bar() -> str | None:
    """``<desc> <n>/<total>`` of the live progress bar updated last (any library's), or None."""
    try:
        from tqdm.std import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    bars = [bar for bar in list(getattr(tqdm, "_instances", [])) if getattr(bar, "n", None) is not None]
    if not bars:
        return None
    bar = max(bars, key=lambda b: getattr(b, "last_print_t", 0.0) or getattr(b, "start_t", 0.0) or 0.0)
    description = (getattr(bar, "desc", "") or "").rstrip(": ") or "progress"
    total = f"/{bar.total:g}" if getattr(bar, "total", None) else ""
    return f"{description} {bar.n:g}{total}"


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


_QUIET = {"on": False}


def quiet_progress_bars() -> None:
    """Libraries' bars count but draw to ``os.devnull``; the trainer's log dictionaries are not printed (idempotent)."""
    if _QUIET["on"]:
        return
    from tqdm import std

    original = std.tqdm.__init__
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def quiet_init(self, *args, **kwargs):
        if kwargs.get("file") in (None, sys.stderr, sys.stdout):
            kwargs["file"] = sink
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init
    try:
        import transformers.trainer as trainer_module
        from transformers.trainer_callback import ProgressCallback

        class QuietProgressCallback(ProgressCallback):
            """The trainer's progress bar (counted, drawn to devnull) without printing each step's log dict."""

            def on_train_begin(self, args, state, control, **kwargs):
                super().on_train_begin(args, state, control, **kwargs)
                if self.training_bar is not None:  # what the heartbeat calls it
                    self.training_bar.set_description("optimizer steps", refresh=False)

            def on_log(self, args, state, control, logs=None, **kwargs):
                return None

        # the trainer picks PrinterCallback when transformers' logging is quieter than WARN (as the CLI sets it)
        trainer_module.DEFAULT_PROGRESS_CALLBACK = trainer_module.PrinterCallback = QuietProgressCallback
    except ImportError:  # pragma: no cover
        pass
    _QUIET["on"] = True

