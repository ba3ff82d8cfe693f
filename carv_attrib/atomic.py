"""Atomic writes: a temporary sibling renamed onto the target only when the write succeeded.

`atomic_path` for one file, `atomic_dir` for a folder written whole (curate's WebDataset shards, saved
datasets, sidecar folders).

The temporary name is `.NAME.HOST.PID.tmp`, so a dead writer's leftovers are recognisable
(`store.shards._is_stale_tmp`) and two writers never share one. Below every stage (search/ writes
the index with it, store/ the shards), so it imports nothing of the package but `space`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from carv_attrib.space import space_for

_HOST = socket.gethostname().replace(".", "-") or "host"


@contextlib.contextmanager
def atomic_path(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    A full disk or quota inside the block is DiskFullError naming `path` and `need` (the bytes
    the write needs, when the caller knows them; `carv_attrib.space`); the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    try:
        with space_for(path, need):
            yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `path`; when the block succeeds it takes `path`'s
    place (a folder already there is moved aside, then removed), else it is removed with all it holds.

    Readers see the old folder or the new one, whole; a crash leaves at most the temporary
    `.NAME.HOST.PID.tmp` (or the old folder's `.NAME.HOST.PID.old`) beside it. A full disk inside the
    block is DiskFullError naming `path` and `need` (bytes), as in `atomic_path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        with space_for(path, need):
            tmp.mkdir(parents=True)
            yield tmp
        moved = False
        if path.exists() or path.is_symlink():
            os.replace(path, old)
            moved = True
        try:
            os.replace(tmp, path)
        except BaseException:
            if moved:
                os.replace(old, path)
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
