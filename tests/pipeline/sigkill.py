"""Kill a stage running in a subprocess with SIGKILL right after its first shard is done."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from carv_attrib.store.shards import ShardStore


def sigkill_after_first_shard(proc: subprocess.Popen, store: ShardStore, timeout: float = 300.0) -> None:
    """Wait (up to `timeout`, generous for a loaded machine) for a done marker, then SIGKILL."""
    deadline = time.monotonic() + timeout
    while not store.done_shards() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "process ended early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
