"""``debug.kill_at=<point>:<n>`` (conf/sweep.yaml): the sweep SIGKILLs itself the n-th time it reaches a named
write point — a test hook for "kill a sweep anywhere and rerun it" (tests/test_cache_integrity.py). Off by default;
off, a point costs one comparison.

The points sit inside writes, with the temporary file or folder whole and not yet renamed into place:

* ``model_save``: an unpacked model (embedded, tiny-random) saved into its temporary folder;
* ``checkpoint_write``: a trained checkpoint (or a derived stage's) complete in its temporary folder;
* ``record_write``: the records file rewritten to its temporary name;
* ``curve_write``: a run's training curves copied into the results folder;
* ``leaderboard_write``: the leaderboard's markdown table.
"""

from __future__ import annotations

import os
import signal

from harness.errors import HarnessError

POINTS = ("model_save", "checkpoint_write", "record_write", "curve_write", "leaderboard_write")

_armed: tuple[str, int] | None = None
_reached = 0


def arm(kill_at: str | None) -> None:
    """Set (or clear, with None) the point at which this process kills itself."""
    global _armed, _reached
    _armed, _reached = None, 0
    if kill_at in (None, ""):
        return
    point, _, count = str(kill_at).partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise HarnessError(f"debug.kill_at={kill_at}: write <point>:<n> with n ≥ 1 and point one of {', '.join(POINTS)}")
    _armed = (point, int(count))


def reached(point: str) -> None:
    """Called at a write point: SIGKILL this process when it is the armed point's n-th occurrence."""
    global _reached
    if _armed is None or _armed[0] != point:
        return
    _reached += 1
    if _reached == _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
