"""Verified cache entries and stale temporaries.

Nothing in the cache is trusted because it exists: every entry is checked before it is reused, and a damaged
one is rebuilt, with one log line::

    cache: <what> <path> damaged (<which file, why>); rebuilding

**Folder entries** (``publish`` writes, ``is_whole`` checks). The entry is built in a temporary folder; ``publish``
writes ``harness_manifest.json`` into it LAST — every file's relative name, size and SHA-256 — and renames the
folder into place. Before reuse, ``is_whole`` compares every file's size, then its SHA-256, with the manifest; a
missing or unreadable manifest (a folder from before manifests, or one cut short), a missing, resized or changed
file, or a file the manifest does not list means damaged. The damaged folder is replaced when its rebuild is
published (renamed aside, then deleted), so a process still reading it never sees the path vanish. Cost: one read
of the entry per process — SHA-256 reads ~0.5 GB/s on one busy core: 1.2 s for the 538 MB embedded model, ~30 s for
a 7B model in bf16 (about what loading it costs); a folder verified earlier in the same process whose files' sizes
and modification times are unchanged is not read again.

**File entries** (``write_checked`` writes, ``read_checked`` reads). One file whose first line is
``harness-cache sha256=<hex> size=<bytes>`` and whose rest is the payload (JSON, safetensors or npz bytes); the
payload is hashed as it is read and parsed only when it matches, so the bytes checked are the bytes used. A damaged
file is deleted at once. **Converted data files** are named by their content's hash and plain (lm-eval reads them),
so ``ensure_file`` compares the file with the bytes it must hold and rewrites it when they differ.

Which check each cached artifact uses:

* manifest — unpacked models (embedded, tiny-random) ``<cache>/models/<name>/``; trained checkpoints, derived
  stages' too, ``<cache>/checkpoints/<run_id>/``; Bradley-Terry reward models ``<cache>/rewards/bradley-terry-<key>/``;
* checked file — reference log-probs ``<cache>/reference_logprobs/<key>.safetensors`` (the list trainer's:
  ``lists-<key>.safetensors`` beside them); pair and example log-probs
  ``<cache>/tasks/{pair,example}_logps/<key>.json``; judge verdicts (AI feedback) ``<cache>/feedback/<key>.json``;
  win-rate outputs, the reference's and the policies', ``<cache>/tasks/win_rate_generations/<key>.json``; the
  toxicity classifier head ``<cache>/tasks/toxicity/minilm_toxigen-<key>.npz``;
* content against the name's hash — converted data files ``<cache>/tasks/{gsm8k,truthfulqa_mc}/*.jsonl``.

**Built once, whoever asks first** (``build_once``). Units of a fanned-out sweep (``harness.run.fanout``) start
together and need the same shared stages — the unpacked model, a derived SFT stage, a reward model, judge verdicts,
reference log-probs and outputs. Each is built as "check the cache → take the entry's lock → check again → build →
publish": the lock is an exclusive ``fcntl`` lock on ``.<entry>.lock`` beside the entry, so a second process waits
and then finds the entry whole instead of building it again; a reader never needs the lock (entries appear by a
rename). The lock dies with its process, so a killed builder leaves no stale lock. Every build appends one line to
``builds.jsonl`` in the entry's folder (entry, what, seconds, host, pid, time) — the tests count them to prove no
stage was built twice. ``fcntl`` locks hold across processes of one machine and, on Linux NFS v4 / Lustre / GPFS,
across machines.

**Stale temporaries.** Every temporary file or folder is ``.<name>.<pid>.tmp`` (``harness.inputs.paths.
temporary_path``): atomic writes, checkpoint and model staging folders, training scratch folders. When a sweep
starts, ``remove_stale_temporaries`` deletes those under the cache and the results folder whose writer is gone
(``os.kill(pid, 0)`` finds no process), one log line each with its size, and keeps those of live processes. The
check assumes the cache is written from one machine (process ids are per machine).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

from harness.inputs.paths import atomic_write_bytes, atomic_write_text, temporary_path

log = logging.getLogger("harness")

MANIFEST = "harness_manifest.json"
MANIFEST_FORMAT = 1
CHECKED_HEADER = re.compile(rb"harness-cache sha256=([0-9a-f]{64}) size=(\d+)\n")
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")

_whole: dict[str, tuple] = {}  # folder → file signature when it last verified in this process


# folder entries ------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file below ``folder`` by relative name, the manifest excepted."""
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST}


def _signature(folder: Path) -> tuple:
    stats = []
    for name, path in _files(folder).items():
        stat = path.stat()
        stats.append((name, stat.st_size, stat.st_mtime_ns))
    manifest = (folder / MANIFEST).stat()
    return (str(folder.resolve()), manifest.st_size, manifest.st_mtime_ns, tuple(stats))


def write_manifest(folder: Path) -> None:
    """Write ``folder``'s manifest (every file's size and SHA-256); the last thing written into an entry."""
    files = {name: {"size": path.stat().st_size, "sha256": file_sha256(path)} for name, path in _files(folder).items()}
    atomic_write_text(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    _whole[str(folder.resolve())] = _signature(folder)


def entry_damage(folder: Path) -> str | None:
    """Why the folder entry is not whole (which file, why), or None when it matches its manifest."""
    if not folder.is_dir():
        return "not a folder"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} unreadable"
    present = _files(folder)
    for name, expected in files.items():
        if name not in present:
            return f"{name}: missing"
        size = present[name].stat().st_size
        if size != expected["size"]:
            return f"{name}: {size} bytes, the manifest says {expected['size']}"
    extra = sorted(set(present) - set(files))
    if extra:
        return f"{extra[0]}: not in the manifest"
    signature = _signature(folder)
    if _whole.get(signature[0]) == signature:
        return None
    for name, expected in files.items():
        if file_sha256(present[name]) != expected["sha256"]:
            return f"{name}: SHA-256 differs from the manifest"
    _whole[signature[0]] = signature
    return None


def is_whole(folder: Path, what: str) -> bool:
    """True when the folder entry matches its manifest; False when it is absent, or damaged (logged — the caller
    rebuilds it and ``publish`` replaces it)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    damage = entry_damage(folder)
    if damage is None:
        return True
    log.warning("cache: %s %s damaged (%s); rebuilding", what, folder, damage)
    return False


def discard(path: Path) -> None:
    """Delete a file, folder or symbolic link; nothing if it is gone."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, target: Path) -> Path:
    """Write the manifest into ``staging`` (last), then rename it to ``target``. A damaged entry there is renamed
    aside and deleted; a whole one another process published meanwhile is kept and ours dropped."""
    write_manifest(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, target)  # no entry there (the common case)
        return target
    except OSError:
        pass
    if entry_damage(target) is None:  # another process published the same entry first
        discard(staging)
        return target
    old = temporary_path(target, "damaged")
    try:
        os.rename(target, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(staging, target)
    except OSError:  # a third process got in between: its entry stands, and is checked on use
        discard(staging)
    discard(old)
    return target


# built once ----------------------------------------------------------------------------------
BUILDS = "builds.jsonl"  # one line per build, in the entry's folder (module docstring)
T = TypeVar("T")


@contextmanager
def entry_lock(entry: Path):
    """Hold the exclusive lock of a cache entry (``.<name>.lock`` beside it) for the block; waits for the holder.
    Our own code: the standard library's ``fcntl.flock``, no library offers a lock per cache entry."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(entry: Path, what: str, cached: Callable[[], T | None], build: Callable[[], T]) -> T:
    """``cached()`` when it finds the entry (not None); otherwise, under the entry's lock, ``cached()`` again (another
    process may have built it meanwhile) and only then ``build()``, counted in ``builds.jsonl``."""
    found = cached()
    if found is not None:
        return found
    with entry_lock(entry):
        found = cached()
        if found is not None:
            return found
        began = time.perf_counter()
        value = build()
        count_build(entry, what, time.perf_counter() - began)
        return value


def count_build(entry: Path, what: str, seconds: float) -> None:
    """Append one line for a finished build to ``builds.jsonl`` beside ``entry`` (a whole line, under a lock)."""
    entry = Path(entry)
    line = json.dumps({"entry": entry.name, "what": what, "seconds": round(seconds, 2), "host": socket.gethostname(),
                       "pid": os.getpid(), "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    with open(entry.parent / BUILDS, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line + "\n")
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_builds(folder: Path) -> list[dict]:
    """The builds counted in ``folder`` (``builds.jsonl``), oldest first."""
    path = Path(folder) / BUILDS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# file entries --------------------------------------------------------------------------------
def write_checked(path: Path, data: bytes) -> None:
    """Write ``data`` atomically under a checksum header (see module docstring)."""
    header = f"harness-cache sha256={hashlib.sha256(data).hexdigest()} size={len(data)}\n".encode()
    atomic_write_bytes(path, header + data)


def read_checked(path: Path, what: str) -> bytes | None:
    """The payload of a checked file; None when absent, or damaged (logged and deleted: the caller rebuilds it)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    match = CHECKED_HEADER.match(raw)
    if match is None:
        damage = "no checksum header"
    else:
        data = raw[match.end():]
        if len(data) != int(match[2]):
            damage = f"{len(data)} bytes, the header says {int(match[2])}"
        elif hashlib.sha256(data).hexdigest() != match[1].decode():
            damage = "SHA-256 differs from the header"
        else:
            return data
    log.warning("cache: %s %s damaged (%s); rebuilding", what, path, damage)
    Path(path).unlink(missing_ok=True)
    return None


def read_checked_json(path: Path, what: str):
    """``read_checked`` parsed as JSON (None when absent or damaged)."""
    data = read_checked(path, what)
    return None if data is None else json.loads(data)


def write_checked_json(path: Path, value) -> None:
    write_checked(path, json.dumps(value, ensure_ascii=False).encode("utf-8"))


def ensure_file(path: Path, data: bytes, what: str) -> None:
    """A plain file whose content is known in advance (named by its hash): written when absent or different."""
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return
        log.warning("cache: %s %s damaged (content differs from what its name hashes); rebuilding", what, path)
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, data)


# stale temporaries ---------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts: it is not reaped yet)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _readable_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete every ``.<name>.<pid>.tmp`` under ``root`` (symbolic links followed) whose writer process is gone;
    one log line each. Returns what was removed."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link cycle, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        for name in sorted(dirs) + sorted(files):
            match = TEMPORARY.match(name)
            if match is None or pid_alive(int(match["pid"])):
                continue
            path = Path(folder) / name
            size = _size(path)
            discard(path)
            if name in dirs:
                dirs.remove(name)
            removed.append(path)
            log.info("removed stale temporary %s (%s; its writer, pid %s, is gone)", path, _readable_size(size),
                     match["pid"])
    return removed
