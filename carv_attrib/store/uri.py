"""Run directories addressed by pyarrow filesystem URIs (`pyarrow.fs.FileSystem.from_uri`).

Scope: the index stage. `carv-attrib index RUN` takes RUN as a path or a `file://` URI; with
`--executor ray` its parts read the feature shards and write their index parts through the
`pyarrow.fs` filesystem of that URI (`read_bytes` / `write_bytes`, FAISS indexes as
`faiss.serialize_index` bytes), so a part on another node needs only the URI, on storage every node
mounts. The run directory itself is a POSIX one: its lock (RUN/.lock), the atomic swap of RUN/index
and the shard stores rename and flock files, which object stores (s3://, gs://) cannot do, so a
non-local URI is refused (exit 2): mount the bucket (NFS, Lustre, s3fs, gcsfuse) and give the mount.

    fs, path = split_uri("file:///data/runs/demo")   # (LocalFileSystem, "/data/runs/demo")
    run = local_run("file:///data/runs/demo")        # Path("/data/runs/demo")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from carv_attrib.errors import UsageError

# "file:///abs" or, after pathlib has collapsed its slashes (a CLI argument parsed as a Path), "file:/abs"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_uri(run: str | os.PathLike[str]) -> bool:
    """Whether `run` is written as SCHEME:/... rather than a path."""
    return bool(_SCHEME.match(str(run)))


def local_run(run: str | os.PathLike[str]) -> Path:
    """The local directory of RUN given as a path or a `file://` URI (absolute). UsageError (exit 2)
    for another scheme: the run directory's lock and atomic renames need a POSIX filesystem."""
    text = str(run)
    m = _SCHEME.match(text)
    if m is None:
        return Path(run)
    if m.group(1).lower() != "file":
        raise UsageError(
            f"RUN {text}: a {m.group(1)}:// run directory is not supported (its lock and the index's "
            "atomic swap need a POSIX filesystem); mount the storage (NFS, Lustre, s3fs, gcsfuse) and "
            "give the mounted path or a file:// URI"
        )
    from urllib.parse import unquote, urlparse

    u = urlparse(text)
    if u.netloc not in ("", "localhost"):  # file://HOST/path names another machine's file
        raise UsageError(
            f"RUN {text}: a file:// URI of host {u.netloc!r}; give file:///path (this machine) or a mounted path"
        )
    return Path(unquote(u.path) or "/")  # as_uri() percent-encodes: file:///a%20b is /a b


def run_uri(run: str | os.PathLike[str]) -> str:
    """RUN as an absolute `file://` URI (a path, or a URI as given)."""
    return local_run(run).resolve().as_uri()


def split_uri(uri: str) -> tuple[Any, str]:
    """(`pyarrow.fs.FileSystem`, path on it) of a URI, by `FileSystem.from_uri`."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def read_bytes(filesystem: Any, path: str) -> bytes:
    """The whole file `path` of `filesystem`."""
    with filesystem.open_input_stream(path) as f:
        return f.read()


def write_bytes(filesystem: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` of `filesystem` whole: into `path`.tmp, then moved onto `path` (a retried
    Ray part overwrites its file, never leaves half of one)."""
    parent = path.rsplit("/", 1)[0]
    if parent:
        filesystem.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp"
    with filesystem.open_output_stream(tmp) as f:
        f.write(data)
    filesystem.move(tmp, path)
