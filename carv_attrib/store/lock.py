"""One writer per run: an advisory `fcntl.flock` on RUN/.lock, held for a whole writing command.

    from carv_attrib.store.lock import run_lock
    with run_lock("runs/demo", "featurize"):          # RunLockedError (exit 2) while another writes
        ...
    with run_lock("runs/demo", "index", wait=True):   # blocks until the holder is done
        ...

Every command that writes a run (encode, featurize, index, evaluate; demo through its stages) takes
it in its pipeline stage, exclusively. `--shard I/N` parts take it shared: they may run together (they
write disjoint shards by design), but not beside a full command. Ray tasks run inside the driver's
command, which holds it for them. The lock file holds one line naming the last holder (host, pid,
command, start time); the kernel releases a flock when its holder dies, so a killed command never
leaves the run locked and its line is only stale text.

Readers (score, status, report) never take it: `is_written` tells them whether a writer is live, so
they repair an interrupted index swap only when nobody is in the middle of one (`RunDir`). A reader
that needs one consistent snapshot of many files (finetune reads every live latent) takes it shared
for the reading only (`read_lock`): no writer is in the middle meanwhile, and it writes nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from carv_attrib.errors import RunLockedError, UsageError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# A process takes the lock once per run: the stages nest (featurize builds the index, demo runs every
# stage) and a second flock on a new descriptor of the same file would wait for the process itself.
_held: dict[str, list[int]] = {}  # realpath of RUN/.lock -> [fd, depth]
_held_guard = threading.Lock()


def lock_path(run: Path | str) -> Path:
    return Path(run) / LOCK_NAME


def _key(run: Path | str) -> str:
    return os.path.realpath(lock_path(run))


def holds(run: Path | str) -> bool:
    """Whether this process holds RUN's lock (in any mode)."""
    with _held_guard:
        return _key(run) in _held


def holder(run: Path | str) -> str:
    """The holder line of RUN/.lock as its last holder wrote it ('' when none was written)."""
    try:
        return lock_path(run).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def is_written(run: Path | str) -> bool:
    """Whether another process holds RUN's lock now: a probe that takes it for an instant and gives it
    back. False for a run without a lock file or one this process holds (its own swap is not "in
    the middle" for itself)."""
    if holds(run):
        return False
    try:
        fd = os.open(lock_path(run), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # any writer (exclusive) refuses a shared probe
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def _refusal(run: Path | str, command: str) -> RunLockedError:
    who = holder(run) or "another command"
    return RunLockedError(
        f"{run} is being written by {who}; `{command}` would mix its data with that one's: wait for it "
        f"to finish, or pass --wait (the lock is {lock_path(run)})"
    )


@contextmanager
def run_lock(
    run: Path | str,
    command: str,
    *,
    wait: bool = False,
    shared: bool = False,
    create: bool = False,
    skip: bool = False,
) -> Iterator[None]:
    """Hold RUN's writer lock for the block: exclusive, or `shared` for `--shard` parts.

    wait: block until the holder is done (a warning names it once) instead of refusing. create: make
    RUN when missing (encode's first run); a directory created here that holds nothing but the lock
    file at the end is removed again, so a refused first encode leaves no trace. Without create, a
    missing RUN takes no lock: the stage refuses it with its own message.
    skip: take none (a dry run writes nothing; a Ray part runs under its driver's lock).
    Raises RunLockedError (exit 2) when another process holds the lock and wait is False.
    Re-entrant within a process (the stages nest).
    """
    root = Path(run)
    made = False
    if skip:
        yield
        return
    if not root.is_dir():
        if not create:
            yield
            return
        root.mkdir(parents=True, exist_ok=True)
        made = True
    key = _key(root)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    fd = os.open(lock_path(root), os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise _refusal(root, command) from None
            log.warning("waiting for %s to finish writing %s", holder(root) or "another command", root)
            fcntl.flock(fd, mode)
        line = (
            f"carv-attrib {command} (pid {os.getpid()} on {platform.node()}, "
            f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')})\n"
        )
        previous, st = os.pread(fd, 4096, 0), os.fstat(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
        with _held_guard:
            _held[key] = [fd, 1]
        try:
            yield
        except UsageError:
            # refused before any write (exit 2 promises that nothing was changed): the holder line
            # goes back to what it was, mtime included
            os.ftruncate(fd, 0)
            os.pwrite(fd, previous, 0)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            raise
        finally:
            with _held_guard:
                del _held[key]
            if made:
                _remove_if_only_the_lock(root)
    finally:
        os.close(fd)  # releases the flock


def _remove_if_only_the_lock(root: Path) -> None:
    """Remove a run directory this command created when it holds nothing but the lock file."""
    try:
        if [p.name for p in root.iterdir()] == [LOCK_NAME]:
            lock_path(root).unlink()
            root.rmdir()
    except OSError:
        pass  # another process wrote into it meanwhile: it is a run now


@contextmanager
def read_lock(run: Path | str, command: str, *, wait: bool = False) -> Iterator[None]:
    """Hold RUN's lock shared for the block, as a reader: while a writer (encode, featurize, ...) holds
    it, RunLockedError (exit 2), or with `wait` block until it is done. Nothing is written (the holder
    line stays the last writer's). A run without a lock file, or one this process already holds,
    takes none (the stage refuses a missing run with its own message)."""
    if holds(run):
        yield
        return
    try:
        fd = os.open(lock_path(run), os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(run) or "another command"
            if not wait:
                raise RunLockedError(
                    f"{run} is being written by {who}; `{command}` reads it when no writer is in the "
                    f"middle: wait for it to finish, or pass --wait (the lock is {lock_path(run)})"
                ) from None
            log.warning("waiting for %s to finish writing %s", who, run)
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the flock
