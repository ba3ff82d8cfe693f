"""The index at the real feature size: FAISS build time, memory, disk, query latency and recall@10 at
D = 76,800 (Wan2.1-1.3B's default feature: 300 layers x 16x16 kron) and at the compressed D' =
16,384 (`--index-dim`), measured at N up to 10^5 on this machine, 10^6 extrapolated from the
measured slopes and labelled so.

Vectors: unit-norm rows whose covariance has the power-law spectrum λ_i ∝ i^(-α) fitted to a real
featurize run (α from bench/results/index_scale.json, `bench/index_scale.py`'s fit of bench_model's
trained `small` model), in a block-orthogonal basis: the D coordinates are cut into blocks of 256 (the
size of one layer's 16x16 feature), each block rotated by its own seeded random orthogonal matrix,
the spectrum's coordinates assigned to blocks by a seeded permutation. (A dense random rotation of
76,800 dims would be a 23 GB matrix.) The rows are generated once, chunk by chunk, into a float16
file (N x D x 2 bytes), and every pass reads it chunk by chunk with plain reads (no memory map, so
the resident-memory figures are the index's own, not page cache).

Per (N, factory), with the tool's own rules (`carv_attrib.search.index`): the training sample is
`train_sample_rows(N, D)` rows (at most 2 GiB of float32: 6,990 rows at D = 76,800), so IVF lists are
min(2^round(log2(4·sqrt(N))), the largest power of two with >= 39 sample points per list); IVF probes
`default_nprobe(nlist)`; `score`'s re-ranking (10·k candidates re-scored from the float16 vectors,
`carv_attrib.search.rerank`) is measured beside the raw search. Exact Flat and HNSW run only where
their float32 vectors fit `--flat-budget-gib`; elsewhere their memory is arithmetic. recall@10 is
against the exact top-10 computed by a streamed brute-force pass over the same float16 rows. Peak
memory is the process's VmHWM growth during the case (reset through /proc/self/clear_refs).

    .venv/bin/python bench/index_scale_real.py --dim 76800 --out bench/results/index_scale_d76800.json
    .venv/bin/python bench/index_scale_real.py --dim 16384 --out bench/results/index_scale_d16384.json
    .venv/bin/python bench/index_scale_real.py --table     # README table from both JSON files
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, write_json  # noqa: E402
from index_scale import query_stats  # noqa: E402

from carv_attrib.search.index import (  # noqa: E402
    MIN_POINTS_PER_LIST,
    index_bytes,
    new_index,
    train_index,
    train_sample_rows,
)
from carv_attrib.search.rerank import VectorStore, fill_index  # noqa: E402

BLOCK = 256  # one layer's 16x16 kron feature
CHUNK_BYTES = 256 << 20  # float32 bytes of one generated / read chunk


def chunk_rows(dim: int) -> int:
    return max(1, CHUNK_BYTES // (4 * dim))


class BlockSynthetic:
    """Rows with covariance R diag(λ) Rᵀ, R block-diagonal orthogonal (blocks of BLOCK), unit-normalised;
    chunk c of stream s is a function of (seed, s, c)."""

    def __init__(self, dim: int, alpha: float, seed: int = 0):
        if dim % BLOCK:
            raise SystemExit(f"--dim must be a multiple of {BLOCK}")
        rng = np.random.default_rng(seed)
        lam = np.arange(1, dim + 1, dtype=np.float64) ** (-alpha / 2)
        self.scale = lam[rng.permutation(dim)].astype(np.float32).reshape(dim // BLOCK, BLOCK)  # (B, 256)
        g = rng.standard_normal((dim // BLOCK, BLOCK, BLOCK))
        self.rot = np.stack([np.linalg.qr(b)[0] for b in g]).astype(np.float32)  # (B, 256, 256)
        self.dim, self.seed = dim, seed

    def chunk(self, stream: int, c: int, n: int) -> np.ndarray:
        g = np.random.default_rng([self.seed, stream, c]).standard_normal((n, self.dim), dtype=np.float32)
        g = (g.reshape(n, -1, BLOCK) * self.scale).transpose(1, 0, 2)  # (B, n, 256)
        x = np.matmul(g, self.rot.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(n, self.dim)  # (n, D)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


class RowFile:
    """An (n, dim) float16 row file read chunk by chunk with plain reads."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = path, dim
        self.n = path.stat().st_size // (2 * dim)

    def read(self, start: int, n: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(2 * self.dim * start)
            x = np.fromfile(f, dtype=np.float16, count=n * self.dim)
        return x.reshape(n, self.dim).astype(np.float32)

    def blocks(self, n: int):
        step = chunk_rows(self.dim)
        for s in range(0, n, step):
            m = min(step, n - s)
            yield np.arange(s, s + m, dtype=np.int64), self.read(s, m)

    def take(self, rows: np.ndarray) -> np.ndarray:
        with open(self.path, "rb") as f:
            out = np.empty((len(rows), self.dim), np.float32)
            for j, r in enumerate(rows):
                f.seek(2 * self.dim * int(r))
                out[j] = np.fromfile(f, dtype=np.float16, count=self.dim)
        return out


def generate(syn: BlockSynthetic, path: Path, n: int, stream: int) -> RowFile:
    """Write n rows of `stream` to `path` as float16 (resumes: a complete file is reused)."""
    if path.exists() and path.stat().st_size == 2 * syn.dim * n:
        return RowFile(path, syn.dim)
    tmp = path.with_suffix(".tmp")
    step = chunk_rows(syn.dim)
    t0 = time.monotonic()
    with open(tmp, "wb") as f:
        for c, s in enumerate(range(0, n, step)):
            f.write(syn.chunk(stream, c, min(step, n - s)).astype(np.float16).tobytes())
    os.replace(tmp, path)
    print(f"generated {n} rows of {syn.dim} dims in {time.monotonic() - t0:.0f} s -> {path}", flush=True)
    return RowFile(path, syn.dim)


def exact_topk(rows: RowFile, n: int, queries: np.ndarray, k: int) -> np.ndarray:
    """(m, k) ids of the exact top-k inner products over the first n rows, streamed."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for ids, x in rows.blocks(n):
        s = queries @ x.T
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return _rss_kib("VmRSS")


def nlist_for(n: int, dim: int) -> int:
    guide = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.log2(max(1, train_sample_rows(n, dim) // MIN_POINTS_PER_LIST)))
    return max(1, min(guide, cap))


def factories_for(n: int, dim: int, flat_budget: int) -> list[str]:
    nl = nlist_for(n, dim)
    out = [f"IVF{nl},SQ8", f"IVF{nl},PQ{dim // 8}x4fs"]
    if n * dim * 4 <= flat_budget:
        out = ["Flat", *out]
        if n <= 20_000:  # HNSW's build at 10^5 x 16,384 on 2 cores: past this run's time
            out.append("HNSW32")
    return out


def run_case(rows: RowFile, n: int, factory: str, queries: np.ndarray, truth: np.ndarray, k: int,
             rerank_r: int, tmp: Path) -> dict[str, Any]:  # fmt: skip
    base_kib = _reset_peak()
    t0 = time.monotonic()
    index = new_index(rows.dim, None if factory == "Flat" else factory, use_gpu=False)
    take = 0
    if not index.is_trained:
        take = train_sample_rows(n, rows.dim)
        pick = np.sort(np.random.default_rng(7).choice(n, size=take, replace=False))
        train_index(index, rows.take(pick), factory)
        del pick
    train_s = time.monotonic() - t0
    keep = factory != "Flat"
    store_dir = tmp / factory.replace(",", "_")
    store_dir.mkdir(parents=True, exist_ok=True)

    fill_index(index, rows.blocks(n), rows.dim, store_dir if keep else None)
    build_s = time.monotonic() - t0
    peak_mib = (_rss_kib("VmHWM") - base_kib) / 1024
    ser_bytes = len(faiss.serialize_index(index))
    vec_bytes = (store_dir / "vectors.bin").stat().st_size if keep else 0
    store = VectorStore(store_dir) if keep else None
    stats = query_stats(index, store, queries, truth, k, rerank_r)
    index = store = None  # free the index before the next case
    shutil.rmtree(store_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "factory": factory,
        "n": n,
        "dim": rows.dim,
        "train_rows": take,
        "train_s": round(train_s, 2),
        "build_s": round(build_s, 2),
        "peak_rss_growth_mib": round(peak_mib, 1),
        "index_bytes": ser_bytes,
        "index_bytes_formula": index_bytes(n, rows.dim, None if factory == "Flat" else factory),
        "rerank_vector_bytes": vec_bytes,
        **stats,
        "load_avg": load_avg(),
    }
    return out


def extrapolate(results: list[dict[str, Any]], dim: int, target: int, rerank_r: int) -> list[dict[str, Any]]:
    """Per factory family (the IVF list count varies with N): t = a·N^b fitted over the measured N, for
    build_s and the re-ranked query ms; memory from `index_bytes` at `target` (the tool's formula,
    checked against the measured serialised sizes) and 2·D bytes per clip of float16 vectors."""
    out = []
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        fam = r["factory"].split(",", 1)[-1] if "," in r["factory"] else r["factory"]
        fams.setdefault(fam, []).append(r)
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["n"])
        row: dict[str, Any] = {"family": fam, "n": target, "measured_n": [r["n"] for r in rs],
                               "label": "extrapolated from the measured sizes, not run"}  # fmt: skip
        fac = f"IVF{nlist_for(target, dim)},{fam}" if rs[0]["factory"].startswith("IVF") else fam
        row["factory"] = fac
        row["index_bytes"] = index_bytes(target, dim, None if fac == "Flat" else fac)
        row["rerank_vector_bytes"] = 2 * dim * target if fac != "Flat" else 0
        if len(rs) >= 2:
            for key in ("build_s", f"query_ms_median_rerank{rerank_r}", "query_ms_median"):
                if all(key in r and r[key] > 0 for r in rs):
                    b, la = np.polyfit(np.log([r["n"] for r in rs]), np.log([r[key] for r in rs]), 1)
                    row[key] = round(float(np.exp(la) * target**b), 2)
                    row[key + "_slope"] = round(float(b), 3)
        out.append(row)
    return out


def num(v: Any, fmt: str = ",.0f") -> str:
    return "" if v is None else format(v, fmt)


def rerank_cell(r: dict[str, Any]) -> str:
    """The extrapolated re-ranked query time; the re-ranked search contains a raw search (of 10·k),
    so where the two separate two-point fits cross it is shown as at least the raw figure."""
    rr, raw = r.get("query_ms_median_rerank10"), r.get("query_ms_median")
    if rr is None:
        return ""
    return f"≥ {raw:,.0f}" if raw is not None and rr < raw else f"{rr:,.0f}"


def table(paths: list[Path]) -> str:
    lines = [
        "| D | N | factory | train rows | build s | peak RSS MiB | index MB | + float16 vectors MB "
        "| query ms | recall@10 | query ms, re-ranked | recall@10, re-ranked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in paths:
        doc = json.loads(p.read_text())
        for r in doc["results"]:
            lines.append(
                f"| {r['dim']:,} | {r['n']:.0e} | {r['factory']} | {r['train_rows']:,} | {r['build_s']:.0f} "
                f"| {r['peak_rss_growth_mib']:,.0f} | {r['index_bytes'] / 1e6:,.0f} "
                f"| {r['rerank_vector_bytes'] / 1e6:,.0f} | {r['query_ms_median']:.1f} | {r['recall@10']:.3f} "
                f"| {num(r.get('query_ms_median_rerank10'), '.1f')} "
                f"| {num(r.get('recall@10_rerank10'), '.3f')} |"
            )
        measured = {(r["factory"], r["n"]) for r in doc["results"]}
        for r in doc.get("skipped", []):
            if r["n"] != doc["config"]["target"] and (r["factory"], r["n"]) not in measured:
                lines.append(
                    f"| {r['dim']:,} | {r['n']:.0e} | {r['factory']} (not run: memory) | | | "
                    f"| {r['index_bytes'] / 1e6:,.0f} (arithmetic) | | | | | |"
                )

        for r in doc["extrapolated"]:
            law = "build_s" in r
            if law and r.get("build_s_slope", 1) <= 0:  # training-dominated, loaded machine: no law
                r = {**r, "build_s": None}
            lines.append(
                f"| {doc['config']['dim']:,} | {r['n']:.0e} | {r['factory']} "
                f"(**{'extrapolated' if law else 'arithmetic'}**) | | {num(r.get('build_s'))} | "
                f"| {r['index_bytes'] / 1e6:,.0f} | {r['rerank_vector_bytes'] / 1e6:,.0f} "
                f"| {num(r.get('query_ms_median'))} | | {rerank_cell(r)} | |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=76_800)
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--target", type=int, default=1_000_000, help="the N extrapolated to")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=10)
    ap.add_argument("--flat-budget-gib", type=float, default=8.0)
    ap.add_argument("--spectrum", type=Path, default=Path("bench/results/index_scale.json"))
    ap.add_argument("--data", type=Path, default=Path("bench/_work/index_real"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", action="store_true", help="print the README table of the result files")
    args = ap.parse_args()
    if args.table:
        print(
            table(sorted(Path("bench/results").glob("index_scale_d*.json"), key=lambda p: -int(p.stem[13:])))
        )
        return
    out = args.out or Path(f"bench/results/index_scale_d{args.dim}.json")
    faiss.omp_set_num_threads(2)
    load_start = load_avg()
    alpha = json.loads(args.spectrum.read_text())["spectrum"]["power_law_alpha"]
    syn = BlockSynthetic(args.dim, alpha)
    sizes = [int(x) for x in args.sizes.split(",")]
    args.data.mkdir(parents=True, exist_ok=True)
    rows = generate(syn, args.data / f"rows_{args.dim}.f16", max(sizes), stream=1)
    queries = syn.chunk(2, 0, args.queries).astype(np.float16).astype(np.float32)  # (m, D)
    budget = int(args.flat_budget_gib * (1 << 30))
    results, skipped = [], []
    tmp = args.data / "cases"
    for n in sizes:
        t = time.monotonic()
        truth = exact_topk(rows, n, queries, args.k)
        print(f"exact top-{args.k} of {n} rows: {time.monotonic() - t:.0f} s", flush=True)
        for factory in factories_for(n, args.dim, budget):
            r = run_case(rows, n, factory, queries, truth, args.k, args.rerank, tmp)
            results.append(r)
            print(json.dumps(r), flush=True)
        if n * args.dim * 4 > budget:
            skipped.append({"factory": "Flat", "n": n, "dim": args.dim, "index_bytes": index_bytes(n, args.dim, None),
                            "why": f"float32 vectors exceed --flat-budget-gib {args.flat_budget_gib}"})  # fmt: skip
    ext = extrapolate(results, args.dim, args.target, args.rerank)
    skipped.append({"factory": "Flat", "n": args.target, "dim": args.dim,
                    "index_bytes": index_bytes(args.target, args.dim, None), "why": "arithmetic"})  # fmt: skip
    write_json(
        out,
        {
            "benchmark": "index_scale_real",
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "threads": 2,
                "block": BLOCK,
                "power_law_alpha": alpha,
                "vectors": "unit-norm rows, block-orthogonal basis, stored float16",
            },  # fmt: skip
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
            "results": results,
            "skipped": skipped,
            "extrapolated": ext,
        },
    )
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
