"""A full disk or quota (ENOSPC, EDQUOT) as one line naming the path and the space needed.

Every write of a run, and of `score -o` / `report -o`, goes through a temporary name and a rename
(`shards.atomic_path`; the index through `RunDir.index_swap`), so a write that fails on a full disk
leaves nothing that a rerun could take for finished: the temporary file or directory is removed
and what was committed before stays. This module only turns the failure into `DiskFullError`
(exit 3, `carv_attrib.errors`) with the path, the bytes the write needed (when the caller knows
them) and what is free now.

The errors come in several shapes, each seen on a full tmpfs here: `OSError` with `errno` ENOSPC
(28) or EDQUOT (122) from Python's own writes and from pyarrow ("[Errno 28] Error writing bytes to
file. Detail: [errno 28] No space left on device"); `RuntimeError` from FAISS's `write_index`
("write error in PATH: 1048531 != 1600000 (No space left on device)"); `OSError` without errno
from numpy's `np.save` ("200000 requested and 131056 written"). `is_no_space` recognises each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from carv_attrib.errors import DiskFullError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# strerror texts (glibc) and arrow's "[errno N]" spelling of the same two errors
_MARKERS = tuple(
    m.lower()
    for m in (
        os.strerror(errno.ENOSPC),
        os.strerror(errno.EDQUOT),
        f"[errno {errno.ENOSPC}]",
        f"[errno {errno.EDQUOT}]",
    )
)


# numpy's `np.save` / `ndarray.tofile` on a full disk: OSError without errno, "N requested and M
# written" (numpy/core/src/multiarray/convert.c); a short write of a local file means no room
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` is a full disk or an exceeded quota, in any of the shapes above."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    text = str(exc).lower()
    return any(m in text for m in _MARKERS) or (
        isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(text) is not None
    )


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free to this user on the file system holding `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as `df -h`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def no_space_error(
    exc: BaseException, path: str | os.PathLike[str] | None, need: int | None = None
) -> DiskFullError:
    """The one-line DiskFullError for `exc` while writing `path` (None: the path the error names)."""
    where = path if path is not None else getattr(exc, "filename", None)
    quota = (isinstance(exc, OSError) and exc.errno == errno.EDQUOT) or (
        os.strerror(errno.EDQUOT).lower() in str(exc).lower()
    )
    what = "disk quota exceeded" if quota else "no space left on device"
    parts = [f"{what} writing {where}" if where else what]
    room = []
    if need is not None:
        room.append(f"it needs about {human_bytes(need)}")
    free = free_bytes(where) if where else None
    if free is not None:
        room.append(f"{human_bytes(free)} free there now")
    if room:
        parts.append(" (" + ", ".join(room) + ")")
    parts.append(
        "; nothing partly written was kept and what was committed before stays: free space "
        "(or raise the quota) and rerun the same command, which resumes"
    )
    err = DiskFullError("".join(parts))
    err.path = None if where is None else str(where)
    err.need = need
    return err


def check_space(path: str | os.PathLike[str], need: int, what: str) -> None:
    """Refuse (DiskFullError, exit 3) before any work when `need` bytes for `what` clearly do not fit
    in what is free on `path`'s file system now: nothing is written. Free space that cannot be read
    (or a file system that reports none) lets the work go on; a later full disk is still caught."""
    free = free_bytes(path)
    if free is not None and need > free:
        err = DiskFullError(
            f"{what} needs about {human_bytes(need)} on the file system of {path}, but "
            f"{human_bytes(free)} are free there; it was not written, and what was committed before "
            "stays: free space (or write the run elsewhere) and rerun the same command"
        )
        err.path, err.need = str(path), need
        raise err


@contextlib.contextmanager
def space_for(path: str | os.PathLike[str], need: int | None = None) -> Iterator[None]:
    """Turn a full disk or quota inside the block into DiskFullError naming `path` and `need` (bytes).

    Use it around a write whose size the caller knows; nested, the outermost names the path and
    the size. The CLI turns any other such error into the same line without the size
    (`cli.common.handle_errors`)."""
    try:
        yield
    except DiskFullError as inner:
        # a write inside a larger one (the FAISS file inside RUN/index's temporary directory): the
        # outer names what the user knows, with its own size when it has one
        cause = inner.__cause__ or inner
        raise no_space_error(cause, path, need if need is not None else inner.need) from cause
    except (OSError, RuntimeError) as exc:
        if is_no_space(exc):
            raise no_space_error(exc, path, need) from exc
        raise
