"""SIGTERM handled like Ctrl-C while a stage commits its work.

Batch schedulers (Slurm, Kubernetes, `timeout`) stop a job with SIGTERM, whose default action kills
the process at once: the clips finished since the last commit would be lost. Inside
`sigterm_as_interrupt()` SIGTERM raises KeyboardInterrupt instead, so the stage's own interrupt path
commits what is finished and the CLI exits with its "interrupted; rerun to resume" line.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread for the duration of the block (elsewhere,
    e.g. in a worker thread, signals cannot be handled and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
