"""An index for a million clips: build time, memory, query latency and recall@10 of FAISS factories
against the exact index, at N = 10^4, 10^5, 10^6, on synthetic features with a real spectrum.

Features: the eigenvalue spectrum of a real featurize run (the trained `small` benchmark model of
bench/bench_model.py, K = 8, the default 16x16 kron feature, cosine-normalised), fitted by a power law
λ_i ∝ i^(-α) over its top eigenvalues and extended to --dim dimensions; synthetic rows are
Gaussian with that covariance in a random orthonormal basis, unit-normalised like the cosine
preconditioner's output, generated chunk by chunk from seeds (never all in memory). Queries are
drawn the same way. --dim is the indexed dimension (a PCA/projection of the full feature would give
it; `faiss.index_factory`'s "PCAR<d>," prefix does that inside the index).

For each N and factory: train on a seeded sample of min(N, 100 000) rows, add all N, then search
--queries queries one at a time (the latency a user sees), with re-ranking as `score` does it
(R·k candidates re-scored exactly from float16 vectors, `carv_attrib.search.rerank`) and without;
IVF probes `carv_attrib.search.index.default_nprobe(nlist)` lists (nlist/16), HNSW's efSearch is 2k.
recall@10 is |top-10 ∩ exact top-10| / 10, averaged over queries. Memory is the serialised index
plus, for re-ranking, the float16 vectors (on disk, memory-mapped). Where a factory is not run at a
size (HNSW at 10^6: hours on 2 cores), the fitted law t = a·N^b of its smaller sizes is stated.

    .venv/bin/python bench/index_scale.py      # ~20 min on 2 cores -> bench/results/index_scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402

from carv_attrib.search.index import new_index, search, train_index  # noqa: E402
from carv_attrib.search.rerank import VectorStore, fill_index, rerank  # noqa: E402

CHUNK = 50_000


def real_spectrum(work: Path) -> np.ndarray:
    """Eigenvalues (descending) of the cosine-normalised features of a real featurize run."""
    from bench_model import BenchModel, prepare

    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.store.features import feature_matrix

    bm = prepare(BenchModel(work=work))
    run_featurize(FeaturizeConfig(run=bm.run, model=str(bm.model), draws=8, device="cpu"))
    _, x = feature_matrix(bm.run)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    s = np.linalg.svd(x, compute_uv=False)
    return (s**2 / len(x))[: len(x) - 1]


def fit_power_law(eig: np.ndarray) -> tuple[float, float]:
    """λ_i ≈ c·i^(-α) by least squares in log-log over the non-negligible eigenvalues."""
    keep = eig > eig[0] * 1e-6
    i = np.arange(1, keep.sum() + 1)
    slope, icpt = np.polyfit(np.log(i), np.log(eig[keep]), 1)
    return float(-slope), float(math.exp(icpt))


class Synthetic:
    """Rows with covariance Q diag(λ) Qᵀ, unit-normalised; chunk c of a stream is a function of (seed, c)."""

    def __init__(self, dim: int, alpha: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.scale = (np.arange(1, dim + 1) ** (-alpha / 2)).astype(np.float32)
        self.q = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.dim = dim

    def rows(self, stream: int, start: int, n: int) -> np.ndarray:
        out = []
        for c in range(start // CHUNK, (start + n - 1) // CHUNK + 1):
            g = np.random.default_rng([stream, c]).standard_normal((CHUNK, self.dim), dtype=np.float32)
            x = (g * self.scale) @ self.q.T
            out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        x = np.concatenate(out)
        off = start - (start // CHUNK) * CHUNK
        return np.ascontiguousarray(x[off : off + n])

    def blocks(self, n: int, stream: int = 1):
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            yield np.arange(s, s + m, dtype=np.int64), self.rows(stream, s, m)


def exact_topk(syn: Synthetic, n: int, queries: np.ndarray, k: int) -> np.ndarray:
    """(m, k) ids of the exact top-k inner products, streamed over the rows."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for ids, x in syn.blocks(n):
        s = queries @ x.T
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def query_stats(index: Any, store: VectorStore | None, queries: np.ndarray, truth: np.ndarray, k: int,
                rerank_r: int) -> dict[str, Any]:  # fmt: skip
    """Median query ms and recall@k of `queries` (m, d) searched one at a time, raw and (with a
    vector store) re-ranked from R·k candidates, against `truth` (m, k) exact ids."""
    lat_raw, lat_rr, hits_raw, hits_rr = [], [], [], []
    for qi, q in enumerate(queries):
        t = time.monotonic()
        _, ids = search(index, q[None], k)
        lat_raw.append(time.monotonic() - t)
        hits_raw.append(len(set(ids[0].tolist()) & set(truth[qi].tolist())))
        if store is not None:
            t = time.monotonic()
            _, cand = search(index, q[None], k * rerank_r)
            _, ids2 = rerank(store, q[None], cand, k)
            lat_rr.append(time.monotonic() - t)
            hits_rr.append(len(set(ids2[0].tolist()) & set(truth[qi].tolist())))
    out = {
        "query_ms_median": round(1e3 * statistics.median(lat_raw), 3),
        f"recall@{k}": round(sum(hits_raw) / (k * len(queries)), 4),
    }
    if lat_rr:
        out[f"query_ms_median_rerank{rerank_r}"] = round(1e3 * statistics.median(lat_rr), 3)
        out[f"recall@{k}_rerank{rerank_r}"] = round(sum(hits_rr) / (k * len(queries)), 4)
    return out


def run_factory(syn: Synthetic, n: int, factory: str | None, queries: np.ndarray, truth: np.ndarray,
                k: int, rerank_r: int, tmp: Path) -> dict[str, Any]:  # fmt: skip
    t0 = time.monotonic()
    index = new_index(syn.dim, factory, use_gpu=False)
    if not index.is_trained:
        take = min(n, 100_000)
        sample_ids = np.sort(np.random.default_rng(7).choice(n, size=take, replace=False))
        sample = np.concatenate(
            [x[np.isin(ids, sample_ids)] for ids, x in syn.blocks(n)]
        )  # streamed: one chunk in memory at a time, plus the sample
        train_index(index, sample, factory)
    train_s = time.monotonic() - t0
    keep = factory is not None
    store_dir = tmp / (factory or "flat").replace(",", "_")
    store_dir.mkdir(parents=True, exist_ok=True)

    fill_index(index, syn.blocks(n), syn.dim, store_dir if keep else None)
    build_s = time.monotonic() - t0
    index_bytes = len(faiss.serialize_index(index))
    vec_bytes = (store_dir / "vectors.bin").stat().st_size if keep else 0
    store = VectorStore(store_dir) if keep else None

    out = {
        "factory": factory or "Flat",
        "n": n,
        "train_s": round(train_s, 2),
        "build_s": round(build_s, 2),
        "index_bytes": index_bytes,
        "rerank_vector_bytes": vec_bytes,
        **query_stats(index, store, queries, truth, k, rerank_r),
    }
    return out


def factories_for(n: int, dim: int) -> list[str | None]:
    """Flat (exact); IVF with 8-bit scalar codes (dim bytes per vector); IVF with 4-bit fast-scan PQ
    (dim/16 bytes: 32 at 512); HNSW up to 10^5. 8-bit PQ and OPQ are left out: their training took
    26 s (PQ32) and 83 s (OPQ64) on 20 000 vectors here, and the fast-scan codes re-ranked from the
    stored vectors reach the recall target without them."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))  # FAISS's guideline: 4·sqrt(N) to 16·sqrt(N) lists
    out: list[str | None] = [None, f"IVF{nlist},SQ8", f"IVF{nlist},PQ{dim // 8}x4fs"]
    if n <= 100_000:
        out.append("HNSW32")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/model"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/index_scale.json"))
    args = ap.parse_args()

    faiss.omp_set_num_threads(2)
    load_start = load_avg()
    eig = real_spectrum(args.work)
    alpha, c = fit_power_law(eig)
    print(f"real spectrum: {len(eig)} eigenvalues, power law alpha {alpha:.3f}", flush=True)
    syn = Synthetic(args.dim, alpha)
    queries = syn.rows(2, 0, args.queries)
    results = []
    with tempfile.TemporaryDirectory(dir=args.work.parent) as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            truth = exact_topk(syn, n, queries, args.k)
            for factory in factories_for(n, args.dim):
                r = run_factory(syn, n, factory, queries, truth, args.k, args.rerank, Path(tmp) / str(n))
                results.append(r)
                print(json.dumps(r), flush=True)
    # HNSW at 10^6 is not run: its build time extrapolated from the sizes that were.
    h = [r for r in results if r["factory"] == "HNSW32"]
    law = None
    if len(h) >= 2:
        b, log_a = np.polyfit(np.log([r["n"] for r in h]), np.log([r["build_s"] for r in h]), 1)
        law = {"law": "build_s = a * N^b", "a": float(np.exp(log_a)), "b": float(b),
               "build_s_at_1e6": float(np.exp(log_a) * 1e6**b),
               "bytes_at_1e6": 1e6 * (4 * args.dim + 2 * 32 * 4)}  # fmt: skip
    write_json(
        args.out,
        {
            "benchmark": "index_scale",
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "threads": 2,
                "vectors": "unit-norm, cosine-preconditioned like the default index",
            },  # fmt: skip
            "spectrum": {
                "source": "featurize of bench_model's trained small model, 64 clips, K=8, 16x16 kron",
                "eigenvalues": eig.tolist(),
                "power_law_alpha": alpha,
                "power_law_c": c,
            },  # fmt: skip
            "machine": machine_info(),
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
            "results": results,
            "hnsw_extrapolated": law,
        },
    )


if __name__ == "__main__":
    main()
