"""Exact re-ranking for approximate indexes: the preconditioned vectors kept on disk beside the index.

An IVF-PQ / OPQ / HNSW index holds a million clips in a few hundred MB by storing codes, not vectors,
so its scores are approximate and its top-k misses some true neighbours. `score` therefore asks the
index for R·k candidates and re-scores them exactly against the stored vectors (TRAK and FAISS's own
"refine" step do the same: `faiss.IndexRefineFlat`). The vectors live in RUN/index/vectors.bin, an
(n, d) row-major memory-mapped file of unit rows (float16 by default: half the disk, and a relative
error of about 2^-11 per entry at any scale) with their norms in float32 (vector_norms.npy), written
shard by shard, never all in memory; RUN/index/vector_ids.npy gives each row's clip id.

    store = VectorStore.write(dir, blocks, dim, "float16")     # blocks: iterable of (ids, (n_s, d))
    scores, ids = rerank(VectorStore(dir), queries, candidate_ids, k=10)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

VECTOR_DTYPES = ("float16", "float32")


class VectorStore:
    """RUN/index/vectors.bin + vector_ids.npy: exact preconditioned vectors by clip id."""

    def __init__(self, directory: Path | str):
        d = Path(directory)
        meta = np.load(d / "vector_ids.npy", allow_pickle=False)  # (n,) int64, row order
        self.ids = meta
        self._order = np.argsort(meta, kind="stable")
        self._sorted = meta[self._order]
        self.norms = np.load(d / "vector_norms.npy", allow_pickle=False)  # (n,) float32
        dtype, dim = (d / "vectors.meta").read_text().split()
        self.dim = int(dim)
        self.vectors = np.memmap(d / "vectors.bin", dtype=np.dtype(dtype), mode="r").reshape(-1, self.dim)

    @staticmethod
    def write(
        directory: Path | str, blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, dtype: str
    ) -> int:
        """Append blocks of (ids (n_s,) int64, vectors (n_s, dim) float32) in `dtype`; returns n."""
        if dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector dtype {dtype}: choose one of {', '.join(VECTOR_DTYPES)}")
        d = Path(directory)
        ids, norms = [], []
        with open(d / "vectors.bin", "wb") as f:
            for block_ids, vecs in blocks:
                # unit rows in `dtype` and the norms in float32: float16 keeps its 2^-11 relative
                # precision whatever the scale (TRAK vectors can be tiny, identity ones huge)
                v = np.asarray(vecs, dtype=np.float32)
                n = np.linalg.norm(v, axis=1)
                f.write(
                    np.ascontiguousarray(v / np.where(n > 0, n, 1)[:, None], dtype=np.dtype(dtype)).tobytes()
                )
                ids.append(np.asarray(block_ids, dtype=np.int64))
                norms.append(n.astype(np.float32))
        np.save(d / "vector_ids.npy", np.concatenate(ids) if ids else np.zeros(0, np.int64))
        np.save(d / "vector_norms.npy", np.concatenate(norms) if norms else np.zeros(0, np.float32))
        (d / "vectors.meta").write_text(f"{dtype} {dim}\n")
        return int(sum(len(x) for x in ids))

    @staticmethod
    def concat(directory: Path | str, parts: list[Path], dim: int, dtype: str) -> int:
        """Join the stores `VectorStore.write` wrote in `parts` (directories, in order) into one in
        `directory`, byte for byte what one `write` of all their blocks in that order writes (the
        Ray parts of `carv-attrib index`); returns n. The parts' files are left to the caller."""
        d = Path(directory)
        with open(d / "vectors.bin", "wb") as out:
            for p in parts:
                with open(Path(p) / "vectors.bin", "rb") as f:
                    while chunk := f.read(64 << 20):
                        out.write(chunk)
        ids = [np.load(Path(p) / "vector_ids.npy", allow_pickle=False) for p in parts]
        norms = [np.load(Path(p) / "vector_norms.npy", allow_pickle=False) for p in parts]
        np.save(d / "vector_ids.npy", np.concatenate(ids) if ids else np.zeros(0, np.int64))
        np.save(d / "vector_norms.npy", np.concatenate(norms) if norms else np.zeros(0, np.float32))
        (d / "vectors.meta").write_text(f"{dtype} {dim}\n")
        return int(sum(len(x) for x in ids))

    def rows(self, clip_ids: np.ndarray) -> np.ndarray:
        """(m, d) float32 vectors of `clip_ids` (m,) int64; KeyError for an id not stored."""
        pos = np.searchsorted(self._sorted, clip_ids)
        pos = np.clip(pos, 0, len(self._sorted) - 1)
        if len(clip_ids) and not np.array_equal(self._sorted[pos], clip_ids):
            raise KeyError("some candidate ids are not in the vector store")
        rows = self._order[pos]
        return np.asarray(self.vectors[rows], dtype=np.float32) * self.norms[rows][:, None]


def rerank(
    store: VectorStore, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query (m, d) float32 with its candidate ids (m, c) int64 (-1 =
    none), best first: (scores (m, k') float32, ids (m, k') int64), k' = min(k, c), -1 where a query
    had fewer than k' candidates."""
    m, c = candidates.shape
    kk = min(k, c)
    out_s = np.full((m, kk), -np.inf, dtype=np.float32)
    out_i = np.full((m, kk), -1, dtype=np.int64)
    for r in range(m):
        cand = candidates[r][candidates[r] >= 0]
        if cand.size == 0:
            continue
        s = store.rows(cand) @ queries[r].astype(np.float32)  # (c_r,)
        top = np.argsort(-s, kind="stable")[:kk]
        out_s[r, : top.size], out_i[r, : top.size] = s[top], cand[top]
    return out_s, out_i


def fill_index(
    index: Any,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    dim: int,
    store_dir: Path | str | None = None,
    dtype: str = "float16",
) -> None:
    """Add every block (ids (n_s,) int64, vectors (n_s, dim) float32) to the FAISS `index` in one
    streamed pass; with `store_dir`, keep the exact vectors there too (`VectorStore.write`, `dtype`).
    ValueError for bad vectors (`search.index.add_vectors`)."""
    from carv_attrib.search.index import add_vectors

    def added() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for ids, vecs in blocks:
            add_vectors(index, ids, vecs)
            yield ids, vecs

    if store_dir is not None:
        VectorStore.write(store_dir, added(), dim, dtype)
    else:
        for _ in added():
            pass
