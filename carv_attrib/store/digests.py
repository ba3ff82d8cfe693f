"""Checksums of an index directory's files, recorded in index_info.json and checked on open.

`digest_tree` records each file's size and sha256 when the index is built (a second read of what
was just written, in the build's temporary directory); `verify_tree` checks them each time `score`
opens the index, before FAISS or numpy read a byte. A file up to FULL_VERIFY_BYTES is hashed
whole; a larger one (a million-clip FAISS file is tens of GB) is checked by its size and by
SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes at fixed offsets, which finds truncation and most
damage for a fixed 4 MiB read; its full sha256 is still recorded, for `sha256sum` by hand.
`doc_digest` is index_info.json's own checksum (a hand edit of the document is refused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from carv_attrib.errors import DamagedFileError

FULL_VERIFY_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 1 << 16
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the size and SAMPLE_BLOCKS blocks at evenly spaced offsets (first and last included)."""
    h = hashlib.sha256(str(size).encode())
    last = max(0, size - SAMPLE_BLOCK)
    with open(path, "rb") as f:
        for k in range(SAMPLE_BLOCKS):
            f.seek(last * k // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def file_digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex[, "sampled": hex when size > FULL_VERIFY_BYTES]}."""
    size = path.stat().st_size
    d: dict[str, Any] = {"size": size, "sha256": sha256_file(path)}
    if size > FULL_VERIFY_BYTES:
        d["sampled"] = sampled_sha256(path, size)
    return d


def digest_tree(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative posix path: file_digest} of every file under `directory` but the names in `skip`."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): file_digest(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def verify_tree(directory: Path, recorded: dict[str, dict[str, Any]], repair: str) -> None:
    """Check the files `recorded` (`digest_tree`) under `directory`; DamagedFileError (exit 2) naming
    the first missing, resized or changed one and `repair`. An empty record (an index built before
    checksums) checks nothing."""
    directory = Path(directory)
    for name, want in recorded.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DamagedFileError(f"{path} is missing; {repair}") from None
        if size != want["size"]:
            raise DamagedFileError(
                f"{path} is damaged ({size} bytes, {want['size']} when the index was built); {repair}"
            )
        if "sampled" in want:
            ok = sampled_sha256(path, size) == want["sampled"]
        else:
            ok = sha256_file(path) == want["sha256"]
        if not ok:
            raise DamagedFileError(
                f"{path} is damaged (its sha256 is not the one recorded when the index was built); {repair}"
            )


def doc_digest(doc: dict[str, Any]) -> str:
    """sha256 of a JSON document's canonical form, its own "digest" key left out."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()
