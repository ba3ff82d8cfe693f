"""RUN/index built in parts (`carv-attrib index --executor ray`) and kept as shards (`--index-shards S`).

The driver (`carv_attrib.pipeline.index`) fits the preconditioner and trains the coarse quantizer /
codec exactly as the local build does (the same seeded sample), once; the trained empty index is
serialised (`search.index.serialize`) and every part fills a copy of it with a contiguous run of
the live feature shards, in the order the local build adds them (`split_groups`). A part reads its
shards and writes its FAISS file through the `pyarrow.fs` filesystem of the run's URI
(`carv_attrib.store.uri`), so a part on another node needs only the URI and shared storage.

    merged part by part (`search.index.merge_into`, in part order): IVF lists append in order, flat
    codes concatenate, so the merged index's `faiss.serialize_index` bytes are the local build's;
    or kept as S shard files (`--index-shards S`, RUN/index/shards/NNNNN.faiss), which `score`
    searches all and merges (`search.index.ShardedIndex`): the results of the one index.

The exact re-ranking vectors are written per part and concatenated (`VectorStore.concat`): the same
bytes again. FAISS's on-disk inverted lists (`faiss.contrib.ondisk.merge_ondisk`) were not used: they
need a bare IndexIVF (our clip ids live in an IndexIDMap2 around it) and leave the lists in a separate
.ivfdata file, so the index is no longer one self-contained file that one build's bytes can be
compared with; shards give the same "more than one host's memory" without that.

    groups = split_groups(sel, 4)                       # [{shard: rows}, ...] contiguous, in order
    n = fill_part(PartJob(...))                         # in a Ray task or in-process
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carv_attrib.search.index import deserialize, load_index, merge_into, serialize
from carv_attrib.search.rerank import VectorStore, fill_index
from carv_attrib.store.features import feature_block
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import read_parquet
from carv_attrib.store.uri import split_uri, write_bytes

SHARDS_DIR = "shards"  # RUN/index/shards/00000.faiss ... with --index-shards S > 1
PARTS_DIR = ".parts"  # a build's part files inside the temporary index directory, removed after


def shard_name(i: int) -> str:
    """The file name of index shard i: 00000.faiss."""
    return f"{i:05d}.faiss"


def split_groups(sel: dict[int, list[int]], n: int) -> list[dict[int, list[int]]]:
    """`sel` ({feature shard: rows}, in the local build's order) cut into at most n contiguous groups
    of whole feature shards, balanced by rows (a group ends where its cumulative rows pass j/n of the
    total); no group is empty, so fewer than n come back when there are fewer shards."""
    items = [(s, r) for s, r in sel.items() if len(r)]
    total = sum(len(r) for _, r in items)
    n = max(1, min(n, len(items)))
    groups: list[dict[int, list[int]]] = [{} for _ in range(n)]
    j, seen = 0, 0
    for k, (s, rows) in enumerate(items):
        left = len(items) - k  # shards still to place, this one included
        # the next group once this one has a shard and its share of the rows is reached, or when the
        # groups after it need every shard left
        if groups[j] and (seen * n // total > j or left < n - j):
            j += 1
        groups[j][s] = rows
        seen += len(rows)
    return groups


@dataclass
class PartJob:
    """One part: fill the trained empty index with `shards` (feature shard, rows) of the run at
    `run_uri` and write it to `index_out` (a path on that URI's filesystem); with `vector_dir`, also
    write the part's exact vectors there (`VectorStore.write`, `vector_dtype`, `dim`). `empty` and
    `pre` may be Ray object refs (one copy in the object store for all parts)."""

    part: int
    run_uri: str
    shards: list[tuple[int, list[int]]]
    empty: Any  # bytes of `serialize(trained empty index)`, or its ObjectRef
    pre: Any  # the fitted Preconditioner, or its ObjectRef
    index_out: str
    dim: int
    vector_dir: str | None = None
    vector_dtype: str | None = None


def _resolve(x: Any) -> Any:
    if type(x).__name__ == "ObjectRef":
        import ray

        return ray.get(x)
    return x


def part_blocks(run_uri: str, shards: list[tuple[int, list[int]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids (n_s,) int64, features (n_s, D) float32) of each (shard, rows), read through the
    `pyarrow.fs` filesystem of `run_uri`: the blocks `iter_feature_blocks` gives the local build."""
    fs, root = split_uri(run_uri)
    store = RunDir(root).features  # paths only: nothing is touched but through `fs`
    for shard, rows in shards:
        t = read_parquet(
            str(store.shard_path(shard)), ["clip_id", "feature"], repair=store.repair(shard), filesystem=fs
        )
        block = feature_block(t, rows)
        if block is not None:
            yield block


def fill_part(job: PartJob, progress: Callable[[str, dict[str, Any]], None] | None = None) -> int:
    """Run one part (`PartJob`); returns the vectors it added. `progress("shard", {"part", "rows"})`
    after each feature shard added. Raises ValueError for bad vectors. Idempotent: a part run again
    (Ray retrying a dead worker) rewrites its files whole."""
    index = deserialize(_resolve(job.empty))
    pre = _resolve(job.pre)

    def preconditioned() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids_s, feats_s in part_blocks(job.run_uri, job.shards):
            yield ids_s, pre.prepare_train(feats_s)  # (n_s, D) preconditioned, as the local build's
            if progress is not None:  # the block was added by now
                progress("shard", {"part": job.part, "rows": len(ids_s)})

    if job.vector_dir is not None:
        Path(job.vector_dir).mkdir(parents=True, exist_ok=True)
    fill_index(index, preconditioned(), job.dim, job.vector_dir, job.vector_dtype or "float16")
    fs, _ = split_uri(job.run_uri)
    write_bytes(fs, job.index_out, serialize(index))
    return int(index.ntotal)


def merge_parts(empty: bytes, paths: list[Path]) -> Any:
    """The index of the part files `paths` merged in order into a copy of `empty` (one part in memory
    beside the merged index at a time; each file is removed once merged)."""
    merged = deserialize(empty)
    for p in paths:
        part = load_index(p)
        merge_into(merged, part)
        del part
        Path(p).unlink()
    return merged


def join_vectors(out: Path, jobs: list[PartJob], dim: int, dtype: str) -> None:
    """The parts' exact vectors joined into `out` (`VectorStore.concat`), their directories removed."""
    dirs = [Path(j.vector_dir) for j in jobs if j.vector_dir is not None]
    VectorStore.concat(out, dirs, dim, dtype)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
