"""Content addressing of training clips: what each latent row was made from.

A clip's **source key** is sha256(file content, caption) (16 hex): the same bytes under the same
caption are the same work, wherever the file lives (a moved videos folder re-encodes nothing); a
changed file, a re-cut video or an edited caption is a new key, so `encode` redoes exactly that clip.
A missing file has the key of "missing" plus its caption; once the file is back the key changes and the
clip is encoded again without being asked.

A clip inside a WebDataset tar shard or a saved Hugging Face dataset (`store.inputs`) is a byte range
of that file (`video.member`): its key hashes exactly those bytes, so it equals the loose file's, and
its stat is the container's (a rewritten shard is re-hashed).

Hashing reads every byte, so the file's (path, size, mtime_ns) is recorded beside its hash and a
later run re-hashes only files whose stat changed (git's index does the same). The frame policy and
the model are not in the key: they are the latents stage's configuration, fingerprinted once per run
(`carv_attrib.store.shards`), and a run never mixes two of them.

The committed manifest (RUN/manifest/clips.parquet) holds the clip table plus these columns; it is
written last by `encode`, so a killed or refused encode leaves the previous manifest live.
"""

from __future__ import annotations

import hashlib
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from carv_attrib.store.manifest import ClipTable
from carv_attrib.store.shards import atomic_path
from carv_attrib.video.member import open_source, source_stat

SOURCE_COLUMNS = ("source_size", "source_mtime_ns", "source_sha256", "source_key")
_HASH_THREADS = 4  # hashlib releases the GIL: a few threads keep a disk or network share busy
_CHUNK = 256  # paths per task: one future per chunk, not per row
_IN_FLIGHT = 4  # chunks in flight per thread: memory stays bounded at 10^6 rows


@dataclass(frozen=True)
class SourceId:
    """A video file as found: size (bytes) and mtime (ns) from stat, sha256 of its bytes (64 hex).
    All None: the file does not exist; sha256 None with a size: it exists but could not be read, or is
    not a regular file (a directory, FIFO, socket or device: those are never opened)."""

    size: int | None
    mtime_ns: int | None
    sha256: str | None

    @property
    def missing(self) -> bool:
        return self.size is None


MISSING = SourceId(None, None, None)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a tar / Arrow member's bytes (`video.member`): the same clip
    loose and inside a shard hashes the same."""
    with open_source(str(path)) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _identify(path: str, known: dict[tuple[str, int, int], str]) -> SourceId:
    try:
        st = source_stat(path)  # follows links (a Hub-cache symlink is its blob); a member: its tar's
    except OSError:
        return MISSING
    if not stat.S_ISREG(st.st_mode):
        # A FIFO would block open() until a writer comes (for ever: before any decode timeout), a
        # device may never end, a directory or socket cannot be read: keyed by its stat, never opened.
        # The decoder names it (`not_a_file`) from the same inode.
        return SourceId(st.st_size, st.st_mtime_ns, None)
    sha = known.get((path, st.st_size, st.st_mtime_ns))
    if sha is None:
        try:
            sha = file_sha256(path)
        except OSError:
            sha = None
    return SourceId(st.st_size, st.st_mtime_ns, sha)


def bounded_map(
    fn: Callable[[str], Any], items: Iterable[str], threads: int = _HASH_THREADS, chunk: int = _CHUNK
) -> Iterator[Any]:
    """fn over items in `threads` threads, results in order, with at most threads × _IN_FLIGHT chunks
    of `chunk` items submitted at a time (`ThreadPoolExecutor.map` submits every item at once: one
    future per row, gigabytes at 10^6 rows)."""
    pending: deque[Future[list[Any]]] = deque()
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        while True:
            while len(pending) < threads * _IN_FLIGHT:
                batch = [x for _, x in zip(range(chunk), it)]
                if not batch:
                    break
                pending.append(pool.submit(lambda b: [fn(x) for x in b], batch))
            if not pending:
                return
            yield from pending.popleft().result()


def identify_files(
    paths: list[str],
    known: dict[tuple[str, int, int], str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[SourceId]:
    """The SourceId of each path, in order. `known` maps (path, size, mtime_ns) to a sha256 recorded
    earlier: a file whose stat still matches is not read again."""
    known = known or {}
    out: list[SourceId] = []
    for i, ident in enumerate(bounded_map(lambda p: _identify(p, known), paths)):
        out.append(ident)
        if progress is not None and (i + 1) % 1024 == 0:
            progress(i + 1)
    return out


@dataclass
class FileSurvey:
    """The stat of each path, no byte read (`encode --dry-run`): size and mtime_ns (-1: missing),
    whether it is a regular file, and the sha256 where `known` has it for that exact stat."""

    size: Any  # np.ndarray int64
    mtime_ns: Any  # np.ndarray int64
    regular: Any  # np.ndarray bool
    known_sha: dict[int, str]  # position -> sha256 recorded for the same (path, size, mtime_ns)

    @property
    def missing(self) -> Any:
        return self.size < 0

    def ident(self, j: int) -> SourceId | None:
        """The SourceId of position j as hashing would give it, or None when only reading it could
        tell (a regular file whose stat is not in `known`)."""
        if self.size[j] < 0:
            return MISSING
        size, mtime = int(self.size[j]), int(self.mtime_ns[j])
        if not self.regular[j]:
            return SourceId(size, mtime, None)
        sha = self.known_sha.get(j)
        return SourceId(size, mtime, sha) if sha is not None else None


def _stat(path: str) -> tuple[int, int, bool]:
    try:
        st = source_stat(path)
    except OSError:
        return -1, -1, False
    return st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode)


def survey_files(paths: list[str], known: dict[tuple[str, int, int], str] | None = None) -> FileSurvey:
    """Stat every path (in bounded threads) without opening any: see `FileSurvey`."""
    import numpy as np

    n = len(paths)
    size = np.empty(n, np.int64)
    mtime = np.empty(n, np.int64)
    regular = np.empty(n, bool)
    known_sha: dict[int, str] = {}
    for j, (s, m, r) in enumerate(bounded_map(_stat, paths, chunk=4096)):
        size[j], mtime[j], regular[j] = s, m, r
        if known and r:
            sha = known.get((paths[j], s, m))
            if sha is not None:
                known_sha[j] = sha
    return FileSurvey(size, mtime, regular, known_sha)


def source_key(ident: SourceId, caption: str) -> str:
    """sha256(content, caption), 16 hex: the identity of one clip's encode work."""
    if ident.sha256 is not None:
        content = ident.sha256
    elif ident.missing:
        content = "missing"
    else:  # unreadable: keyed by its stat, so a fixed file (new mtime) is tried again
        content = f"unreadable:{ident.size}:{ident.mtime_ns}"
    return hashlib.sha256(f"{content}\n{caption}".encode()).hexdigest()[:16]


@dataclass
class SourcedClips:
    """A manifest's clips with the identity of each video file and each clip's source key."""

    clips: ClipTable
    ids: list[SourceId]
    keys: list[str]

    @classmethod
    def identify(cls, clips: ClipTable, known: dict[tuple[str, int, int], str] | None = None) -> SourcedClips:
        ids = identify_files(clips.path, known)
        return cls(clips, ids, [source_key(i, c) for i, c in zip(ids, clips.caption)])

    def __len__(self) -> int:
        return len(self.clips)

    def to_arrow(self) -> pa.Table:
        t = self.clips.to_arrow()
        cols: dict[str, Any] = {
            "source_size": pa.array([i.size for i in self.ids], pa.int64()),
            "source_mtime_ns": pa.array([i.mtime_ns for i in self.ids], pa.int64()),
            "source_sha256": pa.array([i.sha256 for i in self.ids], pa.string()),
            "source_key": pa.array(self.keys, pa.string()),
        }
        for name, col in cols.items():
            t = t.append_column(name, col)
        return t

    def write(self, path: Path) -> None:
        """Write the committed manifest atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(self.to_arrow(), tmp)

    @classmethod
    def read(cls, path: Path) -> SourcedClips | None:
        """The committed manifest, or None when there is none or it predates source keys."""
        if not path.exists():
            return None
        t = pq.read_table(path)
        if "source_key" not in t.column_names:
            return None
        d = t.to_pydict()
        ids = [
            SourceId(s, m, h) for s, m, h in zip(d["source_size"], d["source_mtime_ns"], d["source_sha256"])
        ]
        return cls(ClipTable.from_arrow(t), ids, d["source_key"])

    def known_hashes(self) -> dict[tuple[str, int, int], str]:
        """(path, size, mtime_ns) -> sha256 of every file hashed before: `identify`'s cache."""
        return {
            (p, i.size, i.mtime_ns): i.sha256
            for p, i in zip(self.clips.path, self.ids)
            if i.sha256 is not None and i.size is not None and i.mtime_ns is not None
        }
