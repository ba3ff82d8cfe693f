"""FAISS inner-product index of preconditioned train features, keyed by clip id.

The default is exact: `IndexIDMap2(IndexFlatIP(d))`, so search returns the true top-k inner
products ⟨query, ψ_i⟩ with the clip ids given at build time. For large N a factory string
(e.g. "IVF1024,Flat", "IVF4096,PQ64", "OPQ64,IVF4096,PQ64", "HNSW32") builds an approximate index
with the inner-product metric, trained on a seeded random sample of the vectors; `score` re-ranks
its candidates exactly (`carv_attrib.search.rerank`). A GPU index is used when faiss has GPU support
and sees a CUDA device; `save_index` converts it back to the CPU.

Usage::

    index = build_index(ids, psi)                      # ids (n,) int64, psi (n, d) float32
    save_index(index, "RUN/index/index.faiss")
    index = load_index("RUN/index/index.faiss")
    scores, hits = search(index, queries, k=10)        # (m, 10) float32, (m, 10) int64
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from carv_attrib.atomic import atomic_path
from carv_attrib.errors import UsageError
from carv_attrib.memory import available_memory  # looked up at call time: tests patch it here

log = logging.getLogger(__name__)

DEFAULT_TRAIN_SAMPLE = 100_000
TRAIN_SAMPLE_BYTES = 2 << 30  # the training sample's float32 size at most: 2 GiB (26k rows at D = 19,200)
MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below 39 training points per centroid


def train_sample_rows(n: int, d: int, budget: int | None = None) -> int:
    """Rows of the training sample of an approximate index over n vectors of dimension d: at most
    DEFAULT_TRAIN_SAMPLE and at most `budget` bytes of float32, so that training never holds a
    large share of a million-clip run in memory (budget None: TRAIN_SAMPLE_BYTES)."""
    budget = TRAIN_SAMPLE_BYTES if budget is None else budget
    return max(1, min(n, DEFAULT_TRAIN_SAMPLE, budget // (4 * d)))


def index_bytes(n: int, d: int, factory: str | None) -> int:
    """Approximate memory of an index of n d-dim vectors, from its factory string: 4·d bytes per
    vector (Flat), d·b/8 (SQ<b>), 2·d (SQfp16), m (PQ<m>), m/2 (PQ<m>x4fs), plus HNSW<M>'s
    links (8·M) and the id map (16); IVF centroids and OPQ/PCA matrices are added. A guide for
    refusing what cannot fit, not an exact size."""

    f = factory or "Flat"
    per = 4.0 * d
    if m := re.search(r"PQ(\d+)(x4fs)?", f):
        per = int(m.group(1)) / (2 if m.group(2) else 1)
    elif m := re.search(r"SQ(\d+)", f):
        per = d * int(m.group(1)) / 8
    elif "SQfp16" in f:
        per = 2.0 * d
    if m := re.search(r"HNSW(\d+)", f):
        per += 8 * int(m.group(1))
    fixed = 0
    if m := re.search(r"IVF(\d+)", f):
        fixed += 4 * d * int(m.group(1))
    if re.search(r"(OPQ|PCA)", f):
        fixed += 4 * d * d
    return int(n * (per + 16) + fixed)


def check_fits(
    n: int, d: int, factory: str | None, available: int | None = None, extra: int = 0, extra_what: str = ""
) -> None:
    """Refuse (ValueError) an index that would not fit in the memory available now, before any work.
    `extra`: bytes needed beside it (the trak preconditioner, `search.precondition.trak_bytes`),
    named by `extra_what` in the message."""
    need = index_bytes(n, d, factory) + int(extra)
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise ValueError(
            f"an index of {n} vectors of dimension {d} with {factory or 'Flat'}{extra_what} needs about "
            f"{need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB are available; use a compressed "
            "factory (e.g. IVF4096,SQ8: d bytes per vector) or a smaller feature (--kron-dims)"
        )


def check_trainable(index: Any, n: int, factory: str | None) -> None:
    """Refuse (ValueError) an approximate index that n vectors cannot train: fewer vectors than IVF
    lists (or than 8-bit PQ centroids, 256). Called before any pass over the features."""
    if index.is_trained:
        return
    nlist = ivf_lists(index) or 0
    need = max(nlist, 256 if _has_8bit_pq(index) else 0)
    if n < need:
        raise ValueError(
            f"--index-factory {factory}: {n} vectors cannot train it (it needs at least {need}; "
            f"{MIN_POINTS_PER_LIST}x its {nlist or need} centroids is better); use fewer IVF lists, "
            f"e.g. IVF{max(1, n // MIN_POINTS_PER_LIST)},..., or the default Flat index"
        )


def _has_8bit_pq(index: Any) -> bool:
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        pass
    pq = getattr(inner, "pq", None)
    return pq is not None and getattr(pq, "nbits", 0) == 8


def _as_vectors(vectors: Any, dim: int | None, what: str) -> np.ndarray:
    """C-contiguous float32 (n, d), checked for shape and finiteness."""
    if hasattr(vectors, "detach"):  # a torch tensor
        vectors = vectors.detach().cpu().numpy()
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]} but the index has dimension {dim}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN/Inf; drop those rows first")
    return arr


def _gpu_available(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def new_index(d: int, factory: str | None = None, use_gpu: bool | None = None) -> Any:
    """An empty inner-product `IndexIDMap2` of dimension d: exact `IndexFlatIP` for factory None,
    else `faiss.index_factory(d, factory, METRIC_INNER_PRODUCT)` (to be trained with `train_index`).
    use_gpu None: a GPU when faiss has GPU support and sees a device."""
    if d < 1:
        raise ValueError("vectors must have at least one dimension")
    try:
        inner = (
            faiss.IndexFlatIP(d)
            if factory is None
            else faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        )
    except RuntimeError as exc:  # FAISS's message is a multi-line C++ trace: keep its first line
        first = next(
            (line.strip() for line in str(exc).splitlines() if "Error" in line or "error" in line), ""
        )
        raise ValueError(
            f"--index-factory {factory!r}: FAISS cannot build it for {d}-dimensional vectors"
            f"{' (' + first + ')' if first else ''}; see the FAISS index_factory docs (e.g. IVF1024,Flat or IVF1024,PQ32 "
            f"with {d} divisible by 32)"
        ) from None
    index = faiss.IndexIDMap2(inner)  # faiss's Python wrapper keeps `inner` referenced
    if use_gpu is None:
        use_gpu = _gpu_available(faiss)
    if use_gpu:
        if not _gpu_available(faiss):
            raise ValueError("use_gpu=True but faiss has no GPU support or sees no CUDA device")
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._carv_gpu_res = res  # the resources must outlive the index
    return index


def train_index(index: Any, sample: Any, factory: str | None = None) -> None:
    """Train an approximate index on a sample (m, d) of the vectors it will hold."""
    vecs = _as_vectors(sample, index.d, "training vectors")
    try:
        index.train(vecs)
    except RuntimeError as e:
        raise ValueError(
            f"training the {factory!r} index on {vecs.shape[0]} vectors failed ({e}); "
            "use a smaller factory (fewer IVF lists / PQ centroids) or more vectors"
        ) from e


def add_vectors(index: Any, ids: Any, vectors: Any) -> None:
    """Add vectors (n, d) under clip ids (n,) int64; call once or block by block."""
    vecs = _as_vectors(vectors, index.d, "index vectors")
    ids_arr = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
    if ids_arr.shape != (vecs.shape[0],):
        raise ValueError(f"ids must have shape ({vecs.shape[0]},) to match the vectors, got {ids_arr.shape}")
    index.add_with_ids(vecs, ids_arr)


def build_index(
    ids: Any,
    vectors: Any,
    factory: str | None = None,
    use_gpu: bool | None = None,
    train_sample: int = DEFAULT_TRAIN_SAMPLE,
    seed: int = 0,
) -> Any:
    """An inner-product index over `vectors` (n, d) with ids `ids` (n,) int64, in one call.

    factory None: exact `IndexIDMap2(IndexFlatIP(d))`. Otherwise trained on min(n, train_sample)
    vectors drawn with `seed`. (`carv-attrib index` streams shards through new_index / train_index /
    add_vectors instead.)
    """
    vecs = _as_vectors(vectors, None, "index vectors")
    n, d = vecs.shape
    ids_arr = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids)
    if np.unique(ids_arr).size != ids_arr.size:
        raise ValueError("ids must be unique (they are clip ids)")
    index = new_index(d, factory, use_gpu)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = min(n, int(train_sample))
        train_index(
            index, vecs if take == n else vecs[np.sort(rng.choice(n, size=take, replace=False))], factory
        )
    add_vectors(index, ids_arr, vecs)
    log.info("built %s index: %d vectors of dim %d", factory or "Flat", n, d)
    return index


def _to_cpu(index: Any) -> Any:
    if hasattr(faiss, "index_gpu_to_cpu") and hasattr(index, "_carv_gpu_res"):
        return faiss.index_gpu_to_cpu(index)
    return index


def save_index(index: Any, path: str | os.PathLike[str]) -> None:
    """Write `index` (a GPU one is converted to the CPU) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = _to_cpu(index)
    with atomic_path(path, need=_written_bytes(cpu)) as tmp:  # a full disk leaves no partial file
        faiss.write_index(cpu, str(tmp))


def _written_bytes(index: Any) -> int | None:
    """About the bytes `faiss.write_index` writes: ntotal x (code size + 8-byte id for IVF)."""
    try:
        n, code = int(index.ntotal), int(index.sa_code_size())
    except (AttributeError, RuntimeError):
        return None
    return n * (code + 8)


def load_index(path: str | os.PathLike[str]) -> Any:
    """The CPU index saved at `path`."""
    if not Path(path).exists():
        raise FileNotFoundError(errno.ENOENT, "no FAISS index", str(path))  # .filename: the path
    return faiss.read_index(str(path))


def hnsw_of(index: Any) -> Any:
    """The HNSW graph of an (ID-mapped) HNSW index, else None."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return getattr(inner, "hnsw", None)


def set_nprobe(index: Any, nprobe: int) -> None:
    """Set the number of IVF lists visited per query, or an HNSW index's efSearch (no effect on
    another index)."""
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.efSearch = int(nprobe)
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        log.debug("nprobe ignored: not an IVF index")
        return
    ivf.nprobe = int(nprobe)


def ivf_lists(index: Any) -> int | None:
    """The number of IVF lists of an IVF index, None for any other index."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def default_nprobe(nlist: int) -> int:
    """Lists probed per query unless told otherwise: nlist/16, at least 8 (FAISS's own default, 1,
    misses most neighbours of a small index). `search` widens it when it returns fewer than k hits."""
    return min(nlist, max(8, -(-nlist // 16)))


def search(
    index: Any, queries: Any, k: int | None = 10, nprobe: int | None = None, fill: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products: (scores (m, k) float32, ids (m, k) int64), best first.

    k None means every indexed vector; k is clipped to `index.ntotal`. For an IVF index `nprobe`
    lists are probed (None: `default_nprobe`); with `fill`, a query that gets fewer than k hits is
    searched again with twice the lists, up to all of them, so k ≤ N always returns k results.
    Without `fill`, missing slots have id -1. A `ShardedIndex` is searched shard by shard in threads
    and merged (ties by clip id), the widening decided on the merged result. (A GPU index caps k at
    2048, a faiss limit; indexes from `load_index` are on the CPU.)
    """
    q = _as_vectors(queries, index.d, "queries")
    if isinstance(index, ShardedIndex):  # fanned out over the shards, merged (`ShardedIndex`)
        return _search_sharded(index, q, k, nprobe, fill)
    nlist = ivf_lists(index)
    if nlist is not None:
        set_nprobe(index, nprobe or default_nprobe(nlist))
    k = index.ntotal if k is None else min(int(k), index.ntotal)
    if k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    if hnsw_of(index) is not None:  # efSearch: --nprobe, else 2k (at least 64); never below k
        set_nprobe(index, max(k, nprobe or max(64, 2 * k)))
    if k == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    scores, ids = index.search(q, k)
    probe = nprobe or (default_nprobe(nlist) if nlist else None)
    while fill and nlist is not None and probe < nlist and (ids < 0).any():
        probe = min(nlist, 2 * probe)
        set_nprobe(index, probe)
        short = np.flatnonzero((ids < 0).any(axis=1))  # only the queries that came back short
        s2, i2 = index.search(q[short], k)
        scores[short], ids[short] = s2, i2
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


# -- parts, merging and shards (`carv-attrib index --executor ray`, `--index-shards`) --------------


def serialize(index: Any) -> bytes:
    """The bytes `faiss.write_index` would write for `index` (a GPU index is converted first): what a
    Ray part returns, what the byte-identity tests compare, what a pyarrow output stream receives."""
    return faiss.serialize_index(_to_cpu(index)).tobytes()


def deserialize(data: bytes) -> Any:
    """The CPU index of `serialize`'s bytes (a copy: the trained empty index a part fills)."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _is_ivf(index: Any) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def check_mergeable(index: Any, factory: str | None, what: str) -> None:
    """Refuse (ValueError) a factory whose parts cannot be merged into the index one build would make,
    or whose shards would not search like it: HNSW (a graph: FAISS cannot merge it, and a graph per
    shard finds other neighbours) and the fast-scan codes (`...x4fs`: merged lists are repacked, so the
    bytes differ). Flat, the flat codes (PQ, SQ, RQ) and IVF over them (with OPQ/PCA) merge append-only.
    `what` names the option asking, e.g. "--executor ray"."""
    # An allow-list, not a deny-list: anything not known to merge append-only (refine stages, NSG and
    # HNSW graphs, fast-scan packing, ...) is refused before any part runs.
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(inner, faiss.IndexPreTransform):  # OPQ / PCA: the transform is shared, trained once
        inner = faiss.downcast_index(inner.index)
    flat_codes = isinstance(inner, faiss.IndexFlatCodes)  # Flat, PQ, SQ, RQ: codes concatenate
    ivf = isinstance(inner, faiss.IndexIVF) and not isinstance(inner, faiss.IndexIVFFastScan)
    if not (flat_codes or ivf):
        raise ValueError(
            f"{what}: --index-factory {factory} ({type(inner).__name__}) cannot be split into parts: only "
            "flat codes (Flat, PQ, SQ, RQ) and IVF over them (with OPQ/PCA) merge append-only, not HNSW or "
            "NSG graphs, refine stages or fast-scan codes; use Flat, IVF<n>,Flat|SQ8|PQ<m> or build it locally"
        )


def merge_into(dst: Any, src: Any) -> None:
    """Append `src`'s vectors to `dst` (two `IndexIDMap2` of the same trained empty index, e.g.
    `deserialize` of one `serialize`), as if they had been added to `dst` after its own: IVF lists
    append in order with the inner ids shifted by dst.ntotal, flat codes concatenate, the clip ids
    follow. `src` is emptied. So parts filled from consecutive blocks and merged in order give the
    bytes of one sequential build (`serialize`). (FAISS's own `IndexIDMap2.merge_from` does not
    shift IVF ids, hence this.)"""
    di, si = faiss.downcast_index(dst.index), faiss.downcast_index(src.index)
    ids = np.concatenate([faiss.vector_to_array(dst.id_map), faiss.vector_to_array(src.id_map)])
    di.merge_from(si, int(dst.ntotal) if _is_ivf(di) else 0)
    faiss.copy_array_to_vector(ids.astype(np.int64), dst.id_map)
    dst.ntotal = di.ntotal
    src.ntotal = 0
    src.id_map.clear()
    dst.construct_rev_map()


def index_ids(index: Any) -> np.ndarray | None:
    """(N,) int64 clip ids of an `IndexIDMap2` or `ShardedIndex`, in storage order; None otherwise."""
    if isinstance(index, ShardedIndex):
        return index.id_array()
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    return None


class ShardedIndex:
    """S FAISS shards over disjoint clips, all copies of one trained empty index (same IVF quantizer),
    searched as one: `search` fans a query out to every shard (threads; FAISS releases the GIL) and
    merges the top-k by score, ties by clip id. With the same nprobe every shard probes the lists the
    whole index would, so the results equal one index's (`check_mergeable` factories only).

    shards: list of `IndexIDMap2`; d, ntotal and reconstruct(clip_id) as a FAISS index has them."""

    def __init__(self, shards: list[Any]):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        dims = {int(s.d) for s in shards}
        if len(dims) != 1:
            raise ValueError(f"index shards of different dimensions {sorted(dims)}")
        self.shards = shards
        self.d = dims.pop()
        self._owner: tuple[np.ndarray, np.ndarray] | None = None  # (sorted clip ids, their shard)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def nlist(self) -> int | None:
        """The IVF lists of every shard (None: not IVF)."""
        return ivf_lists(self.shards[0])

    def id_maps(self) -> list[np.ndarray]:
        """Each shard's (n_s,) int64 clip ids, in shard order."""
        return [faiss.vector_to_array(s.id_map).astype(np.int64) for s in self.shards]

    def id_array(self) -> np.ndarray:
        """(N,) int64 clip ids, shard after shard."""
        return np.concatenate(self.id_maps())

    def search_round(self, q: np.ndarray, k: int, nprobe: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every shard's (scores (m, k) float32, ids (m, k) int64) for queries q (m, d) at this nprobe,
        in shard order, no widening (`search` decides that on the merged result). Threads: one per
        shard up to the CPUs."""
        from concurrent.futures import ThreadPoolExecutor

        def one(shard: Any) -> tuple[np.ndarray, np.ndarray]:
            if nprobe is not None:
                set_nprobe(shard, nprobe)
            return shard.search(q, k)

        workers = max(1, min(len(self.shards), os.cpu_count() or 1))
        if workers == 1:
            return [one(s) for s in self.shards]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, self.shards))

    def reconstruct(self, key: int) -> np.ndarray:
        """(d,) float32 vector of clip `key`; RuntimeError where FAISS cannot reconstruct, KeyError
        for an id in no shard."""
        sorted_ids, owners = self._owner_table()
        pos = int(np.searchsorted(sorted_ids, int(key)))
        if pos >= sorted_ids.size or int(sorted_ids[pos]) != int(key):
            raise KeyError(f"clip id {key} is in no index shard")
        return self._reconstruct_in(int(owners[pos]), int(key))

    def _owner_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted clip ids (N,) int64, the shard of each (N,) int32): 12 bytes a clip (a dict: ~100)."""
        if self._owner is None:
            maps = self.id_maps()
            ids = np.concatenate(maps)  # (N,) int64
            owner = np.repeat(np.arange(len(maps), dtype=np.int32), [len(m) for m in maps])  # (N,)
            order = np.argsort(ids, kind="stable")
            self._owner = (ids[order], owner[order])
        return self._owner

    def _reconstruct_in(self, shard: int, key: int) -> np.ndarray:
        return self.shards[shard].reconstruct(key)

    def reconstruct_batch(self, keys: np.ndarray) -> np.ndarray:
        """(m, d) float32 vectors of clip ids `keys` (m,) int64, one request per shard that holds any
        (a Ray actor is asked once, not once per vector); errors as `reconstruct`."""
        sorted_ids, owners = self._owner_table()
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, keys), 0, max(0, sorted_ids.size - 1))
        if keys.size and not np.array_equal(sorted_ids[pos], keys):
            raise KeyError("some clip ids are in no index shard")
        out = np.empty((keys.size, self.d), dtype=np.float32)
        for shard in np.unique(owners[pos]) if keys.size else []:
            rows = np.flatnonzero(owners[pos] == shard)
            out[rows] = self._reconstruct_many_in(int(shard), keys[rows])
        return out

    def _reconstruct_many_in(self, shard: int, keys: np.ndarray) -> np.ndarray:
        return np.stack([self.shards[shard].reconstruct(int(k)) for k in keys])


def load_sharded(paths: list[str | os.PathLike[str]]) -> ShardedIndex:
    """The `ShardedIndex` of the shard files `paths`, in order."""
    return ShardedIndex([load_index(p) for p in paths])


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (m, k_s) float32 scores, int64 ids, -1 = empty slot) into the
    best k per query: (m, k) float32, (m, k) int64, by score descending, ties by clip id ascending;
    empty slots last (score -inf, id -1). Equal to one index's search up to exactly tied scores
    (duplicate clips): FAISS orders those by storage position, and each shard cuts a tie at k_s."""
    s = np.concatenate(scores, axis=1).astype(np.float32, copy=False)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    key_s = np.where(i >= 0, s, -np.inf)
    key_i = np.where(i >= 0, i, np.iinfo(np.int64).max)
    out_s = np.full((s.shape[0], k), -np.inf, dtype=np.float32)
    out_i = np.full((s.shape[0], k), -1, dtype=np.int64)
    for r in range(s.shape[0]):
        order = np.lexsort((key_i[r], -key_s[r].astype(np.float64)))[:k]
        out_s[r, : order.size], out_i[r, : order.size] = s[r, order], i[r, order]
    return out_s, out_i


def _merged_round(index: ShardedIndex, q: np.ndarray, k: int, nprobe: int | None):
    got = index.search_round(q, k, nprobe)
    return merge_topk([g[0] for g in got], [g[1] for g in got], k)


def _search_sharded(
    index: ShardedIndex, q: np.ndarray, k: int | None, nprobe: int | None, fill: bool
) -> tuple[np.ndarray, np.ndarray]:
    """`search` over shards: the same nprobe (and the same widening, decided on the merged result)
    as one index of all the shards' vectors."""
    nlist = index.nlist
    k = index.ntotal if k is None else min(int(k), index.ntotal)
    if k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    if k == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    probe = (nprobe or default_nprobe(nlist)) if nlist is not None else None
    scores, ids = _merged_round(index, q, k, probe)
    while fill and nlist is not None and probe < nlist and (ids < 0).any():
        probe = min(nlist, 2 * probe)
        short = np.flatnonzero((ids < 0).any(axis=1))
        s2, i2 = _merged_round(index, q[short], k, probe)
        scores[short], ids[short] = s2, i2
    return scores, ids


class _ShardServer:
    """A Ray actor's state: one index shard, loaded once from a path every node can read."""

    def __init__(self, path: str):
        self.index = load_index(path)

    def info(self) -> tuple[int, int, int | None, np.ndarray]:
        return int(self.index.d), int(self.index.ntotal), ivf_lists(self.index), index_ids(self.index)

    def search(self, q: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        if nprobe is not None:
            set_nprobe(self.index, nprobe)
        return self.index.search(q, k)

    def reconstruct(self, key: int) -> np.ndarray:
        return self.index.reconstruct(key)

    def reconstruct_many(self, keys: np.ndarray) -> np.ndarray:
        return np.stack([self.index.reconstruct(int(k)) for k in keys])


SHARD_ACTOR_TIMEOUT_S = 600  # loading a shard from shared storage: minutes at most; longer means unplaceable


class RayShardedIndex(ShardedIndex):
    """A `ShardedIndex` whose shards are held by Ray actors (one per shard, reserving its file's size
    of memory and no CPU, spread over the nodes, loading its file from shared storage), for shards that together outgrow one host's memory: `search` sends
    each round to every actor and merges here, as `ShardedIndex` does with threads (the same
    results). `ray`: a connected Ray (`carv_attrib.pipeline.ray_exec.ray_session`); `close()` (or
    the session's end) frees the actors."""

    def __init__(self, paths: list[str | os.PathLike[str]], ray: Any):
        self.ray = ray
        actor = ray.remote(_ShardServer)
        # placed by memory (the shard's file size, what it holds), not CPUs: S actors fit on a few
        # CPUs, and SPREAD puts them on different nodes where the cluster has them
        self.actors = [
            actor.options(
                num_cpus=0, memory=max(1, Path(p).stat().st_size), scheduling_strategy="SPREAD"
            ).remote(str(Path(p).resolve()))
            for p in paths
        ]
        if not self.actors:
            raise ValueError("a sharded index needs at least one shard")
        try:  # an actor no node has the memory for would wait for one forever
            infos = ray.get([a.info.remote() for a in self.actors], timeout=SHARD_ACTOR_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            need = max(Path(p).stat().st_size for p in paths)
            raise UsageError(
                f"the {len(paths)} index shard actors did not all start within {SHARD_ACTOR_TIMEOUT_S} s: "
                f"each reserves its shard's size in memory (up to {need / 2**30:.1f} GiB) and the cluster may "
                "have no node with that much free; add nodes or memory, or rebuild with more --index-shards"
            ) from None
        dims = {d for d, _, _, _ in infos}
        if len(dims) != 1:
            raise ValueError(f"index shards of different dimensions {sorted(dims)}")
        self.shards = []
        self.d = dims.pop()
        self._ntotal = sum(n for _, n, _, _ in infos)
        self._nlist = infos[0][2]
        self._ids = [np.asarray(i, dtype=np.int64) for _, _, _, i in infos]
        self._owner = None

    @property
    def ntotal(self) -> int:
        return int(self._ntotal)

    @property
    def nlist(self) -> int | None:
        return self._nlist

    def id_maps(self) -> list[np.ndarray]:
        return self._ids

    def search_round(self, q: np.ndarray, k: int, nprobe: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        q_ref = self.ray.put(q)
        return self.ray.get([a.search.remote(q_ref, k, nprobe) for a in self.actors])

    def _reconstruct_in(self, shard: int, key: int) -> np.ndarray:
        return self.ray.get(self.actors[shard].reconstruct.remote(key))

    def _reconstruct_many_in(self, shard: int, keys: np.ndarray) -> np.ndarray:
        return self.ray.get(self.actors[shard].reconstruct_many.remote(keys))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
