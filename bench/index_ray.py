"""`carv-attrib index`: the local build against `--executor ray` at 1 and 2 parts, and the sharded
build (`--index-shards 2`) with its fanned-out search, on one generated run (same features, same
factory, same training sample on every side: the work is the same, only who does it differs).

Run: N random float32 features of --dim dims in feature shards of --shard rows (written once by
`tests.pipeline.test_index_memory.make_run`), cosine preconditioner, a Flat and an IVF,SQ8 factory
(vectors kept in float16 for re-ranking). Ray is started once before the timings (a local cluster of
--ray-cpus CPUs; its start and one discarded warm-up build, where the workers import carv_attrib and
FAISS, are reported apart) and every build is timed end to end by
`build_run_index`: reading the shards, the preconditioner, training on the driver, the parts
(Ray tasks, one CPU each: Ray sets OMP_NUM_THREADS=1 in its workers), merging and writing RUN/index.
The local build uses FAISS's OpenMP threads (--threads). Every Ray and sharded build is checked
byte-identical (index.faiss, vectors) to the local one. The search row times `search` of --queries
queries (k = 10) on the one index and on the 2 shards (threads).

On this 2-core machine shared with other jobs, two parts can at best halve the add pass, and Ray's
task start, the object store copy of the empty index and the merge are overhead: read the numbers as
the cost of the machinery, not as the speed-up of a cluster.

    .venv/bin/python bench/index_ray.py      # a few minutes -> bench/results/index_ray.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import load_avg, machine_info, write_json  # noqa: E402

from carv_attrib.pipeline.index import IndexConfig, build_run_index  # noqa: E402
from carv_attrib.search.index import load_index, load_sharded, search  # noqa: E402
from tests.pipeline.test_index_memory import make_run  # noqa: E402

FILES = ("index.faiss", "vectors.bin", "vector_ids.npy", "vector_norms.npy")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index", ".index*"))
    return dst


def files_of(run: Path) -> dict[str, bytes]:
    d = run / "index"
    out = {n: (d / n).read_bytes() for n in FILES if (d / n).exists()}
    out |= {f"shards/{p.name}": p.read_bytes() for p in sorted((d / "shards").glob("*.faiss"))}
    return out


def build(src: Path, work: Path, name: str, factory: str | None, **kw: Any) -> tuple[float, Path]:
    run = copy_run(src, work / name)
    t = time.perf_counter()
    build_run_index(IndexConfig(run=run, precondition="cosine", index_factory=factory, **kw))
    return time.perf_counter() - t, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard", type=int, default=2_000)
    ap.add_argument("--factories", default="Flat;IVF64,SQ8", help="';'-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/index_ray.json")
    args = ap.parse_args()

    import ray

    faiss.omp_set_num_threads(args.threads)
    load_start = load_avg()
    factories = [None if f == "Flat" else f for f in args.factories.split(";")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        t = time.perf_counter()
        feature_bytes = make_run(src, args.n, args.dim, shard=args.shard)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(
            num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        ray_start_s = time.perf_counter() - t
        # one discarded Ray build: its workers start and import carv_attrib + faiss (reported apart)
        warmup_s, warm = build(src, work, "warmup", None, executor="ray", parts=args.ray_cpus)
        shutil.rmtree(warm)
        sides = [
            ("local", {}),
            ("ray parts=1", {"executor": "ray", "parts": 1}),
            ("ray parts=2", {"executor": "ray", "parts": 2}),
            ("local index-shards=2", {"index_shards": 2}),
        ]
        try:
            for factory in factories:
                ref: dict[str, bytes] | None = None
                for side, kw in sides:
                    times = []
                    for rep in range(args.repeats):
                        s, run = build(src, work, f"{side}-{rep}".replace(" ", "_"), factory, **kw)
                        times.append(round(s, 3))
                        got = files_of(run)
                        if side == "local" and rep == 0:
                            ref = got
                            one = load_index(run / "index" / "index.faiss")
                        same = None
                        if "shards" not in side:
                            same = got == ref
                        else:
                            assert ref is not None
                            same = {k: v for k, v in got.items() if not k.startswith("shards/")} == {
                                k: v for k, v in ref.items() if k != "index.faiss"
                            }
                            shards = load_sharded(sorted((run / "index" / "shards").glob("*.faiss")))
                        if rep < args.repeats - 1:
                            shutil.rmtree(run)
                    row = {
                        "factory": factory or "Flat",
                        "side": side,
                        "build_s": times,
                        "build_s_median": float(np.median(times)),
                        "bytes_identical_to_local": same,
                    }
                    results.append(row)
                    print(row, flush=True)
                q = np.random.default_rng(1).standard_normal((args.queries, args.dim)).astype(np.float32)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                t = time.perf_counter()
                s1, i1 = search(one, q, 10)
                t_one = time.perf_counter() - t
                t = time.perf_counter()
                s2, i2 = search(shards, q, 10)
                t_sh = time.perf_counter() - t
                row = {
                    "factory": factory or "Flat",
                    "side": "search k=10",
                    "queries": args.queries,
                    "one_index_s": round(t_one, 4),
                    "two_shards_s": round(t_sh, 4),
                    "same_ids": bool(np.array_equal(i1, i2)),
                    "max_abs_score_diff": float(np.abs(s1 - s2).max()),
                }
                results.append(row)
                print(row, flush=True)
        finally:
            ray.shutdown()
    write_json(
        args.out,
        {
            "benchmark": "index_ray",
            # paths relative to the checkout, so the JSON does not name this machine's directories
            "config": {
                k: (
                    str(v.resolve().relative_to(ROOT) if v.resolve().is_relative_to(ROOT) else v)
                    if isinstance(v, Path)
                    else v
                )
                for k, v in vars(args).items()
            },
            "feature_bytes": feature_bytes,
            "generate_s": round(gen_s, 2),
            "ray_start_s": round(ray_start_s, 2),
            "ray_warmup_build_s": round(warmup_s, 2),
            "machine": machine_info(),
            "note": "2 cores shared with other jobs; Ray workers run FAISS with 1 OpenMP thread each",
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
