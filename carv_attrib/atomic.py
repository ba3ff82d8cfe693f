"""Atomic writes: a temporary sibling renamed onto the target only when the write succeeded.

The temporary name is `.NAME.HOST.PID.tmp`, so a dead writer's leftovers are recognisable
(`store.shards._is_stale_tmp`) and two writers never share one. Below every stage (search/ writes
the index with it, store/ the shards), so it imports nothing of the package but `space`.
"""

from __future__ import annotations

import contextlib
import os
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
