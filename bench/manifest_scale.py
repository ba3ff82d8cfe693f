"""Loading and dry-run planning of a VidGen-1M-sized manifest: wall seconds and peak RSS of
`read_manifest` + `plan_encode` as `encode --dry-run` runs them, this tree against another checkout
(default /work/main, the code before `--dry-run` stopped hashing), at 10^5 and 10^6 rows.

Manifests (VidGen-1M JSON, ids `clip-NNNNNNN`, captions of --caption-words words from a fixed
vocabulary, ~6 characters a word):
    missing   --present real files (copies of one tiny file), every other row's file missing
              (the case of issue 23: 999,980 of 1,000,000 absent)
    present   every file present, each a distinct tiny file of --file-bytes bytes (--present-rows rows:
              10^6 files do not fit this machine's time budget; the figure measured is stated)

Each measurement runs in a fresh subprocess (`--worker`), so its peak RSS (ru_maxrss, which includes
the interpreter and pyarrow/numpy imports, ~0.1 GB) is its own; the planning is against an empty run
(a first dry run: nothing on record, every present file counted as to encode). The model load and the
timed sample encode of a dry run are not included (they do not scale with rows).

    .venv/bin/python bench/manifest_scale.py      # ~5 min on 2 cores -> bench/results/manifest_scale.json
    .venv/bin/python bench/manifest_scale.py --before ''   # this tree only
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORDS = [
    "a", "man", "woman", "walks", "along", "the", "beach", "at", "sunset", "camera", "pans", "slowly",
    "city", "street", "night", "lights", "car", "drives", "through", "forest", "dog", "runs", "green",
    "field", "close", "up", "of", "hands", "cooking", "kitchen", "wide", "shot", "mountain", "river",
]  # fmt: skip


def worker(manifest: str, videos: str, run: str) -> dict[str, Any]:
    """One measurement in this process: load, then plan as the dry run of the imported code does."""
    from carv_attrib.pipeline import encode as enc
    from carv_attrib.store.manifest import read_manifest
    from carv_attrib.store.run import RunDir

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    table = read_manifest(manifest, videos)
    t1 = time.perf_counter()
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stat_only = "hash_files" in inspect.signature(enc.plan_encode).parameters
    kw = {"hash_files": False} if stat_only else {}
    plan = enc.plan_encode(RunDir(run), table, False, False, None, **kw)
    files = enc.dry_run_files(plan) if stat_only else None
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "module": enc.__file__,
        "hashes_in_dry_run": not stat_only,
        "rows": len(table),
        "load_s": round(t1 - t0, 2),
        "plan_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "peak_rss_mb_imports": round(rss0 / 1024),
        "peak_rss_mb_after_load": round(rss_load / 1024),
        "peak_rss_mb": round(rss / 1024),
        "to_encode": len(plan.todo),
        "missing": files["missing"] if files else None,
    }


def make(work: Path, rows: int, present: int, file_bytes: int, words: int) -> tuple[Path, Path]:
    """A VidGen-1M JSON manifest of `rows` rows, the first `present` with a file under videos/."""
    name = f"r{rows}-p{present}"
    videos = work / name / "videos"
    manifest = work / name / "manifest.json"
    if manifest.exists():
        return manifest, videos
    videos.mkdir(parents=True, exist_ok=True)
    rng = random.Random(rows)
    for i in range(present):
        path = videos / f"clip-{i:07d}.mp4"
        if not path.exists():
            path.write_bytes(i.to_bytes(8, "big") * (file_bytes // 8))
    with open(manifest.with_suffix(".tmp"), "w") as f:
        f.write("[")
        for i in range(rows):
            cap = " ".join(rng.choices(WORDS, k=words))
            f.write(("," if i else "") + json.dumps({"vid": f"clip-{i:07d}", "caption": cap}))
        f.write("]\n")
    manifest.with_suffix(".tmp").replace(manifest)
    return manifest, videos


def measure(src: Path, manifest: Path, videos: Path, run: Path, python: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{src}")
    cmd = [python, str(BENCH / "manifest_scale.py"), "--worker", str(manifest), str(videos), str(run)]
    res = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("MANIFEST", "VIDEOS", "RUN"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--present", type=int, default=20, help="real files in the `missing` manifests")
    ap.add_argument("--present-rows", type=int, default=100_000, help="rows (all files present) of `present`")
    ap.add_argument("--file-bytes", type=int, default=1024)
    ap.add_argument("--caption-words", type=int, default=30)
    ap.add_argument("--before", default="/work/main", help="checkout measured as `before` ('' skips it)")
    ap.add_argument("--work", default=str(BENCH / "_work" / "manifest_scale"))
    ap.add_argument("--out", default=str(BENCH / "results" / "manifest_scale.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from _util import load_avg, machine_info, write_json

    work = Path(args.work)
    cases = [("missing", int(n), args.present) for n in args.sizes.split(",")]
    if args.present_rows:
        cases.append(("present", args.present_rows, args.present_rows))
    codes = {"after": ROOT} | ({"before": Path(args.before)} if args.before else {})
    results = []
    for kind, rows, present in cases:
        t = time.perf_counter()
        manifest, videos = make(work, rows, present, args.file_bytes, args.caption_words)
        print(
            f"{kind} {rows} rows: manifest {manifest.stat().st_size / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s)"
        )
        for label, src in codes.items():
            m = measure(src, manifest, videos, work / "run-empty", sys.executable)
            print(f"  {label}: {m}")
            results.append({"case": kind, "rows": rows, "present_files": present, "code": label, **m})
    write_json(
        args.out,
        {
            "benchmark": "manifest_scale",
            "config": vars(args) | {"manifest_format": "vidgen json", "run": "empty (a first dry run)"},
            "machine": machine_info(),
            "load_avg": load_avg(),
            "results": results,
        },
    )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
