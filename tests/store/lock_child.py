"""Child processes for the lock and swap tests: each signals by creating a file and waits for one.

    python -m tests.store.lock_child hold RUN READY GO [shared]   hold RUN's lock until GO exists
    python -m tests.store.lock_child swap RUN READY GO            build RUN's index, stopping between
                                                                  the swap's two renames until GO exists

A file handshake (not a sleep): the parent acts only once READY exists, and the child goes on only
once the parent created GO, so each interleaving is the one the test names.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.01)


def hold(run: Path, ready: Path, go: Path, shared: bool) -> None:
    from carv_attrib.store.lock import run_lock

    with run_lock(run, "featurize", shared=shared):
        ready.touch()
        _wait_for(go)


def swap(run: Path, ready: Path, go: Path) -> None:
    import carv_attrib.store.run as store_run
    from carv_attrib.pipeline.index import IndexConfig, build_run_index

    def pause() -> None:
        ready.touch()
        _wait_for(go)

    store_run._between_renames = pause  # the exact point: RUN/index is .index.old, the new one not in
    build_run_index(IndexConfig(run=run, precondition="identity"))


if __name__ == "__main__":
    what, run, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    if what == "hold":
        hold(run, ready, go, shared=len(sys.argv) > 5 and sys.argv[5] == "shared")
    else:
        swap(run, ready, go)


class Child:
    """One `lock_child` process, started at once; `ready()` waits for its signal, `go()` lets it on."""

    def __init__(self, tmp: Path, what: str, run: Path, *extra: str):
        import subprocess

        n = len(list(tmp.glob("ready-*"))) + len(list(tmp.glob("go-*")))
        self.ready_file, self.go_file = tmp / f"ready-{n}", tmp / f"go-{n}"
        repo = Path(__file__).resolve().parents[2]
        cmd = [sys.executable, "-m", "tests.store.lock_child", what, str(run), str(self.ready_file)]
        self.proc = subprocess.Popen([*cmd, str(self.go_file), *extra], cwd=repo, stderr=subprocess.PIPE)

    def ready(self, timeout: float = 120.0) -> Child:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read().decode() if self.proc.stderr else "child ended")
            assert time.monotonic() < deadline, "child never signalled"
            time.sleep(0.01)
        return self

    def go(self, timeout: float = 120.0) -> int:
        self.go_file.touch()
        rc = self.proc.wait(timeout)
        assert rc == 0, self.proc.stderr.read().decode() if self.proc.stderr else rc
        return rc

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
