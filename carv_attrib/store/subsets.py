"""Subsets of training data in the form it ships (`carv_attrib.store.inputs`), for `curate`.

`write_subset(SOURCE, kind, keep, OUT)` writes the clips whose clip ids are in `keep` (or, with
`exclude`, all the others) as the same kind of input SOURCE is, so that a trainer that reads SOURCE reads OUT unchanged, and `encode` (the input
readers) reads exactly the kept clips from it:

- WebDataset shards: OUT is a folder holding one tar per input shard, under the shard's own base name
  (`shards/{00000..00003}.tar` -> `OUT/00000.tar ... OUT/00003.tar`, so the same brace pattern reads
  it); each holds the kept samples of its shard, in tar order, every member of a sample (`.mp4`,
  `.txt`, `.json`, ...) with its header fields and its bytes copied as they are. A shard keeping no
  sample is written as an empty tar, so every shard name of the pattern exists. Per-shard files
  beside the tars (video2dataset's `_stats.json`, `.parquet`) describe the whole shard and are not
  copied;
- a saved Hugging Face dataset: `Dataset.select(kept rows)` saved with `save_to_disk` to OUT (every
  column, rows in their order; a DatasetDict of one split gives that split, as a Dataset). Videos the rows name by a path inside the dataset folder (relative
  paths resolve against it) are linked into OUT at the same relative path, so OUT reads on its own;
- a folder of videos with `.txt` sidecars: OUT is a new folder holding, per kept clip, every file of
  its stem (`a.mp4`, `a.txt`, `a.json`, ...): videos hard-linked (copied across file systems),
  sidecars copied, so editing a caption in OUT never changes the input (a linked video shares the
  input's bytes: a tool that rewrites it in place would change both).

OUT is written whole or not at all (`atomic.atomic_dir`); the input is only read.
"""

from __future__ import annotations

import copy
import os
import shutil
import tarfile
from collections.abc import Container, Set
from dataclasses import dataclass
from pathlib import Path

from carv_attrib.atomic import atomic_dir
from carv_attrib.errors import UsageError
from carv_attrib.store.inputs import (
    _load_hf,
    _video_ext,
    group_samples,
    read_folder,
    read_hf_dataset,
    shard_paths,
    tar_members,
)
from carv_attrib.store.manifest import ManifestOptions, clip_id_for, nfc
from carv_attrib.video.member import parse_member

__all__ = ["SubsetWritten", "check_subset_target", "write_subset"]

DIR_KINDS = ("webdataset", "hf-dataset", "folder")


@dataclass
class SubsetWritten:
    """What `write_subset` wrote: `clips` kept samples / rows / videos, `files` files under OUT
    (`shards`: the tars, WebDataset only), `bytes` their total size."""

    clips: int
    files: int
    bytes: int
    shards: int | None = None


def _inputs_of(source: str | Path, kind: str) -> list[Path]:
    if kind == "webdataset":
        return [Path(p) for p in shard_paths(source)]
    return [Path(source)]


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_subset_target(source: str | Path, kind: str, out: str | Path, overwrite: bool = False) -> None:
    """Refuse (UsageError, exit 2) before any work: an OUT that is, holds or lies inside the input, an
    OUT that is a file, or a non-empty OUT folder without `overwrite`."""
    out = Path(out)
    for p in _inputs_of(source, kind):
        if _overlaps(out, p):
            raise UsageError(f"-o {out} overlaps the input {p}: write the subset to a new folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"-o {out} is a file: the {kind} subset is a folder; give a new folder")
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"-o {out} already exists and is not empty; pass --overwrite to replace it")


class _AllBut:
    """The clip ids not in `ids` (write_subset's `exclude`)."""

    def __init__(self, ids: Set[int]):
        self.ids = ids

    def __contains__(self, cid: object) -> bool:
        return cid not in self.ids


def write_subset(
    source: str | Path,
    kind: str,
    keep: Set[int],
    out: str | Path,
    opts: ManifestOptions | None = None,
    overwrite: bool = False,
    exclude: bool = False,
) -> SubsetWritten:
    """Write the clips of SOURCE (an input of `kind`, one of DIR_KINDS) whose clip ids are in `keep`
    (`exclude`: those that are not) to the folder OUT, in SOURCE's own form (see the module
    docstring). UsageError (exit 2) for a target
    `check_subset_target` refuses, an unreadable input or a kept member the input's end cuts into;
    DiskFullError (exit 3) for a full disk. Nothing is left at OUT unless the whole subset was written."""
    if kind not in DIR_KINDS:
        raise ValueError(f"kind must be one of {DIR_KINDS}, not {kind!r}")
    opts = opts or ManifestOptions()
    out = Path(out)
    check_subset_target(source, kind, out, overwrite)
    wanted: Container[int] = _AllBut(keep) if exclude else keep
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        if kind == "webdataset":
            written = _webdataset(source, wanted, tmp)
        elif kind == "hf-dataset":
            written = _hf_dataset(Path(source), wanted, tmp, opts)
        else:
            written = _folder(Path(source), wanted, tmp)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        written.files = len(files)
        written.bytes = sum(p.stat().st_size for p in files)
    return written


# -- WebDataset ------------------------------------------------------------------------------------


def _webdataset(source: str | Path, keep: Container[int], tmp: Path) -> SubsetWritten:
    shards = shard_paths(source)
    names: dict[str, Path] = {}
    for shard in shards:
        if shard.name in names:
            raise UsageError(
                f"{source}: two shards are named {shard.name} ({names[shard.name]} and {shard}); "
                "the subset keeps shard names, so curate them one folder at a time"
            )
        names[shard.name] = shard
    clips = 0
    for shard in shards:
        members, problem = tar_members(shard)
        size = os.path.getsize(shard)
        samples = group_samples(members)
        with open(shard, "rb") as src, tarfile.open(tmp / shard.name, "w", format=tarfile.PAX_FORMAT) as dst:
            for key, group in samples.items():
                if clip_id_for(nfc(key)) not in keep:
                    continue
                for _, ti in group:
                    if ti.offset_data + ti.size > size:
                        raise UsageError(f"{problem or shard}: the kept member {ti.name} is cut short")
                    src.seek(ti.offset_data)
                    dst.addfile(copy.copy(ti), src)  # the member's bytes, as they are
                clips += 1
    return SubsetWritten(clips=clips, files=0, bytes=0, shards=len(shards))


# -- a saved Hugging Face dataset ------------------------------------------------------------------


def _hf_dataset(source: Path, keep: Container[int], tmp: Path, opts: ManifestOptions) -> SubsetWritten:
    table = read_hf_dataset(source, None, opts)  # rows in the dataset's order
    rows = [i for i, cid in enumerate(table.clip_id) if cid in keep]
    import datasets

    ds = _load_hf(source)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the command prints its own summary
    try:
        ds.select(rows).save_to_disk(str(tmp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    root = source.resolve()
    for i in rows:
        path = table.path[i]
        if parse_member(path) is not None:
            continue  # bytes in the Arrow file: saved with the rows
        p = Path(path).resolve()
        if root in p.parents and p.is_file():
            dest = tmp / p.relative_to(root)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link(p, dest)
    return SubsetWritten(clips=len(rows), files=0, bytes=0)


# -- a folder of videos with .txt sidecars ---------------------------------------------------------


def _folder(source: Path, keep: Container[int], tmp: Path) -> SubsetWritten:
    table = read_folder(source)
    kept = {v for v, cid in zip(table.vid, table.clip_id) if cid in keep}
    for name in sorted(os.listdir(source)):
        src = source / name
        if nfc(os.path.splitext(name)[0]) not in kept or not src.is_file():
            continue
        if _video_ext(name):
            _link(src, tmp / name)
        else:
            shutil.copy2(src, tmp / name)
    return SubsetWritten(clips=len(kept), files=0, bytes=0)


def _link(src: Path, dest: Path) -> None:
    """A hard link of `src` at `dest`, or a copy where links cannot be made (another file system)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
