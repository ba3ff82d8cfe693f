"""A clip stored inside another file: a byte range of a container (a tar member, a value in an Arrow
file), named by one string so that it travels as a clip's `path` (manifest tables, decode workers).

    tar:/data/shards/00000.tar#1536+40213:000000042.mp4
    arrow:/data/ds/data-00000-of-00001.arrow#9120+40213:video[7]

is "`size` bytes at byte `offset` of the container file", the part after the second colon naming the
member for messages only. A name ('#' and '%' percent-encoded in both parts, so the one '#' splits
them) never starts with '/', so it is never mistaken for an absolute path, which every other clip path
is. `#-:` instead of a range is a member that is not there (a tar key with a caption and no video):
a `missing` clip.

The decoders read a member through `open_source` (a read-only, seekable view of the range: PyAV and
decord take file objects), and content addressing hashes exactly the range's bytes, so a clip given as
a loose file and the same bytes inside a tar have the same sha256, the same source key and the same
frames. `source_stat` is the container's stat with the member's size, so the stat cache
(`store.sources`) re-hashes a member only when its container changed.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

SCHEMES = ("tar", "arrow")
_NAME = re.compile(r"^(tar|arrow):([^#]+)#(?:(\d+)\+(\d+)|-):(.*)$", re.S)


def _quote(text: str) -> str:
    return text.replace("%", "%25").replace("#", "%23")


def _unquote(text: str) -> str:
    return text.replace("%23", "#").replace("%25", "%")


@dataclass(frozen=True)
class Member:
    scheme: str  # "tar" | "arrow"
    container: str  # absolute path of the file holding the bytes
    offset: int | None  # None: the member is absent
    size: int | None
    name: str  # the member's name in the container (messages only)

    @property
    def path(self) -> str:
        where = "-" if self.offset is None else f"{self.offset}+{self.size}"
        return f"{self.scheme}:{_quote(self.container)}#{where}:{_quote(self.name)}"

    def __str__(self) -> str:
        return f"{self.name} in {self.container}"


def member_path(scheme: str, container: str, offset: int | None, size: int | None, name: str) -> str:
    """The clip path of `size` bytes at `offset` of `container` (None, None: an absent member)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    return Member(scheme, container, offset, size, name).path


def parse_member(path: str) -> Member | None:
    """The member a clip path names, or None for an ordinary file path."""
    if not path.startswith(SCHEMES):
        return None
    m = _NAME.match(path)
    if m is None:
        return None
    scheme, container, off, size, name = m.groups()
    return Member(
        scheme,
        _unquote(container),
        None if off is None else int(off),
        None if size is None else int(size),
        _unquote(name),
    )


def describe(path: str) -> str:
    """How messages name a clip path: a member as "NAME in CONTAINER", a file as itself."""
    m = parse_member(path)
    return str(m) if m is not None else path


class RangeFile(io.RawIOBase):
    """Read-only, seekable view of `size` bytes at `offset` of an open binary file (which it closes).
    Reads stop at the range's end, or earlier where the container itself ends (a truncated tar)."""

    def __init__(self, f: IO[bytes], offset: int, size: int, name: str = ""):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, offset, size, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_source(path: str) -> IO[bytes]:
    """A binary file object over the clip's bytes: the file itself, or a member's range. Raises
    FileNotFoundError for a member that is absent or whose container is gone."""
    m = parse_member(path)
    if m is None:
        return open(path, "rb")
    if m.offset is None or m.size is None:
        raise FileNotFoundError(f"no video member {m.name} in {m.container}")
    f = open(m.container, "rb")
    # A member cut short by the container's end (a truncated tar) reads as a truncated file would.
    size = max(0, min(m.size, os.fstat(f.fileno()).st_size - m.offset))
    return io.BufferedReader(RangeFile(f, m.offset, size, m.name))


class SourceStat(NamedTuple):
    st_mode: int
    st_size: int
    st_mtime_ns: int


def source_stat(path: str) -> SourceStat:
    """The stat of a clip path that content addressing uses (mode, size, mtime_ns): a file's own, or a
    member's container's with the member's size. Follows links; raises FileNotFoundError (an OSError)
    for an absent member, as for a missing file."""
    m = parse_member(path)
    if m is None:
        st = os.stat(path)
        return SourceStat(st.st_mode, st.st_size, st.st_mtime_ns)
    if m.offset is None or m.size is None:
        raise FileNotFoundError(f"no video member {m.name} in {m.container}")
    st = os.stat(m.container)
    return SourceStat(st.st_mode, m.size, st.st_mtime_ns)


def source_exists(path: str) -> bool:
    try:
        source_stat(path)
    except OSError:
        return False
    return True


def source_size(path: str) -> int:
    return source_stat(path).st_size


def source_bytes_available(path: str) -> int:
    """Bytes of the clip that are really there: a member's size, less what lies past its container's
    end (a truncated tar)."""
    m = parse_member(path)
    if m is None:
        return os.path.getsize(path)
    assert m.offset is not None and m.size is not None
    return max(0, min(m.size, os.path.getsize(m.container) - m.offset))


def av_input(path: str) -> Any:
    """What to hand `av.open` / `decord.VideoReader` for a clip path: the path of a file (as before),
    an open file object over a member's bytes (the caller closes it: `close_input`)."""
    return path if parse_member(path) is None else open_source(path)


def close_input(src: Any) -> None:
    if not isinstance(src, str):
        src.close()
