"""Decode clips in worker processes with a per-clip timeout.

decord can abort (SIGABRT/SIGSEGV inside ffmpeg) or hang on a corrupt file; in-process that would
take the whole run down. Each worker owns one pipe; the parent hands it one clip at a time and
watches both the pipe and the process sentinel. A worker that dies becomes a `crash` failure for
its clip, one that exceeds the timeout is killed and becomes a `timeout` failure; either way a
fresh worker takes its place and the other clips go on.

    with DecodePool(policy, workers=2, timeout=60) as pool:
        for key, result in pool.imap([(0, "a.mp4"), (1, "b.mp4")]):
            ...  # result is a DecodedClip or a ClipFailure, in submission order
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from carv_attrib.video.decode import ClipFailure, DecodedClip, FramePolicy, decode_clip


def _worker_main(conn: Connection, policy: FramePolicy, decode_fn: Callable[..., DecodedClip]) -> None:
    # ffmpeg writes its complaints about corrupt files straight to fd 2; they would tear through
    # the progress display, and the failure is reported through the result anyway.
    if os.environ.get("CARV_ATTRIB_WORKER_STDERR") != "1":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        key, path = task
        try:
            result: Any = decode_fn(path, policy)
        except ClipFailure as exc:
            result = exc
        except Exception as exc:  # anything else is still this clip's failure, not the worker's
            result = ClipFailure("decode_error", f"{type(exc).__name__}: {exc}")
        conn.send((key, result))


class _Worker:
    def __init__(self, ctx: Any, policy: FramePolicy, decode_fn: Callable[..., DecodedClip]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, policy, decode_fn), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[int, Any, str] | None = None  # (seq, key, path)
        self.started = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class DecodePool:
    """In-order decoding over `workers` processes; `workers=0` decodes in this process."""

    def __init__(
        self,
        policy: FramePolicy,
        workers: int = 2,
        timeout: float = 120.0,
        prefetch: int | None = None,
        decode_fn: Callable[..., DecodedClip] = decode_clip,
    ):
        """`decode_fn(path, policy)` must be a module-level function (workers import it by name)."""
        self.policy = policy
        self.decode_fn = decode_fn
        self.n = max(0, workers)
        self.timeout = timeout
        self.prefetch = prefetch or max(4, 4 * self.n)
        self._workers: list[_Worker] = []
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(method)

    def __enter__(self) -> DecodePool:
        self._workers = [_Worker(self._ctx, self.policy, self.decode_fn) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                if w.proc.is_alive() and w.task is None:
                    w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(timeout=1)
            w.kill()
        self._workers = []

    def imap(self, tasks: Iterable[tuple[Any, str]]) -> Iterator[tuple[Any, DecodedClip | ClipFailure]]:
        if self.n == 0:
            for key, path in tasks:
                try:
                    yield key, self.decode_fn(path, self.policy)
                except ClipFailure as exc:
                    yield key, exc
            return
        if not self._workers:
            self.__enter__()
        pending = iter(enumerate(tasks))
        exhausted = False
        done: dict[int, tuple[Any, Any]] = {}
        next_out = 0
        submitted = 0
        while True:
            # Hand out work while the look-ahead window has room.
            for w in self._workers:
                if w.task is None and not exhausted and submitted - next_out < self.prefetch:
                    nxt = next(pending, None)
                    if nxt is None:
                        exhausted = True
                        break
                    seq, (key, path) = nxt
                    w.task = (seq, key, path)
                    w.started = time.monotonic()
                    w.conn.send((key, path))
                    submitted += 1
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                if exhausted:
                    return
                continue
            deadline = min(w.started for w in busy) + self.timeout
            ready = wait(
                [w.conn for w in busy] + [w.proc.sentinel for w in busy],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            for i, w in enumerate(self._workers):
                if w.task is None:
                    continue
                seq, key, path = w.task
                if w.conn in ready:
                    try:
                        _, result = w.conn.recv()
                        done[seq] = (key, result)
                        w.task = None
                        continue
                    except (EOFError, OSError):
                        pass  # the worker died mid-send: handled as a crash below
                if w.conn in ready or w.proc.sentinel in ready or not w.proc.is_alive():
                    code = w.proc.exitcode
                    done[seq] = (
                        key,
                        ClipFailure("crash", f"decoder process died (exit code {code}) on {path}"),
                    )
                elif time.monotonic() - w.started > self.timeout:
                    done[seq] = (
                        key,
                        ClipFailure("timeout", f"decoding took longer than {self.timeout:g} s: {path}"),
                    )
                else:
                    continue
                w.task = None
                w.kill()
                self._workers[i] = _Worker(self._ctx, self.policy, self.decode_fn)
