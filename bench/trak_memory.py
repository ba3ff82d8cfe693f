"""TRAK's preconditioner at the real feature size: memory and time of fitting + preparing, dense
against factored, over D (feature dims of one checkpoint block) and N (train clips).

Each case runs in a fresh subprocess: it generates N×D float32 features (Gaussian, column scales
over three decades: timing and memory do not depend on the values), records its peak RSS, then fits
`--precondition trak` streamed in 64-clip shards as the index build does (`fit_preconditioner` over
an iterator, `num_rows` = N) and prepares all N train vectors shard by shard (`prepare_train`, what
the index adds). Reported: fit and prepare seconds, peak RSS growth over the features (ru_maxrss),
the bytes the preconditioner stores, and `trak_bytes`' estimate of the fit peak (what the index
build's memory preflight uses) beside the measured growth.

A dense case runs only when its estimated fit peak (3 × 8·D²) is below --dense-max-gib (default 4:
the machine is shared); the others are stated by arithmetic, labelled "arithmetic": memory from
`trak_bytes`, fit time scaled from the largest measured dense case at the same N by D³ (the
Cholesky inverse; the N·D² Gram grows slower, so this leans high when N is close to D), prepare time
by D² (an N×D by D×D product). At the real Wan2.1-1.3B feature (300 layers × 16×16 = 76,800 dims)
the dense form needs 44 GiB stored and ~132 GiB to fit.

    nice .venv/bin/python bench/trak_memory.py       # ~10 min on 2 shared cores -> bench/results/trak_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARD = 64

CASE = r"""
import json, resource, sys, time
import numpy as np
from carv_attrib.search.precondition import fit_preconditioner
n, d, form, shard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)
scale = np.logspace(0, -1.5, d).astype(np.float32)
feats = np.empty((n, d), dtype=np.float32)
for a in range(0, n, shard):
    feats[a:a + shard] = rng.standard_normal((min(shard, n - a), d), dtype=np.float32) * scale
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
t = time.perf_counter()
pre = fit_preconditioner("trak", (feats[a:a + shard] for a in range(0, n, shard)), dim=d, num_rows=n, form=form)
fit_s = time.perf_counter() - t
after_fit = rss()
t = time.perf_counter()
for a in range(0, n, shard):
    psi = pre.prepare_train(feats[a:a + shard])
prep_s = time.perf_counter() - t
print(json.dumps({"fit_s": fit_s, "prepare_s": prep_s, "rss_features": base, "rss_after_fit": after_fit,
                  "rss_peak": rss(), "stored_bytes": pre.nbytes, "forms": pre.forms, "ranks": pre.to_dict()["ranks"]}))
"""


def estimates(n: int, d: int, form: str) -> dict[str, float]:
    """`trak_bytes` (what the index preflight uses) for one case, in MiB."""
    from carv_attrib.search.precondition import trak_bytes

    est = trak_bytes(n, [d], form, shard=SHARD)
    return {
        "estimated_fit_peak_mib": round(est["fit_peak"] / 2**20, 1),
        "estimated_peak_mib": round(est["peak"] / 2**20, 1),
        "estimated_stored_mib": round(est["stored"] / 2**20, 1),
    }


def run_case(n: int, d: int, form: str) -> dict[str, Any]:
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(n), str(d), form, str(SHARD)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        return {"N": n, "D": d, "form": form, "error": out.stderr[-1500:], "load_avg": load_avg()}
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["rss_peak"] - m["rss_features"]
    return {
        "N": n,
        "D": d,
        "form": form,
        "how": "measured",
        "fit_s": round(m["fit_s"], 2),
        "prepare_s": round(m["prepare_s"], 2),
        "features_mib": round(n * d * 4 / 2**20, 1),
        "peak_growth_mib": round(grown / 2**20, 1),
        "stored_mib": round(m["stored_bytes"] / 2**20, 1),
        **estimates(n, d, form),
        "ranks": m["ranks"],
        "wall_s": round(time.perf_counter() - t, 1),
        "load_avg": load_avg(),
    }


def by_arithmetic(n: int, d: int, ref: dict[str, Any] | None) -> dict[str, Any]:
    from carv_attrib.search.precondition import trak_bytes

    est = trak_bytes(n, [d], "dense")
    row: dict[str, Any] = {
        "N": n,
        "D": d,
        "form": "dense",
        "how": "arithmetic",
        "features_mib": round(n * d * 4 / 2**20, 1),
        "stored_mib": round(est["stored"] / 2**20, 1),
        **estimates(n, d, "dense"),
    }
    if ref is not None:  # the D³ law from the largest measured dense case at this N
        k = (d / ref["D"]) ** 3
        row |= {
            "fit_s": round(ref["fit_s"] * k, 1),
            "prepare_s": round(ref["prepare_s"] * (d / ref["D"]) ** 2, 1),  # N·D² per pass
            "scaled_from": {"D": ref["D"], "N": ref["N"], "fit_law": "D^3", "prepare_law": "D^2"},
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[5_120, 20_480, 76_800])
    ap.add_argument("--clips", type=int, nargs="+", default=[256, 2_048])
    ap.add_argument("--dense-max-gib", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trak_memory.json")
    ap.add_argument("--reestimate", action="store_true", help="recompute only the estimates in --out")
    args = ap.parse_args()
    from carv_attrib.search.precondition import trak_bytes

    if args.reestimate:
        doc = json.loads(args.out.read_text())
        for row in doc["rows"]:
            row.update(estimates(row["N"], row["D"], row["form"]))
        write_json(args.out, doc)
        return

    rows: list[dict[str, Any]] = []
    for n in args.clips:
        dense_ref = None
        for d in sorted(args.dims):
            if n < d:  # the factored form exists where it is smaller
                rows.append(run_case(n, d, "factored"))
                print(json.dumps(rows[-1]), flush=True)
            if trak_bytes(n, [d], "dense")["fit_peak"] <= args.dense_max_gib * 2**30:
                rows.append(run_case(n, d, "dense"))
                if "error" not in rows[-1]:
                    dense_ref = rows[-1]
            else:
                rows.append(by_arithmetic(n, d, dense_ref))
            print(json.dumps(rows[-1]), flush=True)
    write_json(
        args.out,
        {
            "what": "TRAK preconditioner fit + prepare: peak RSS growth (subprocess per case) and time, dense vs factored",
            "shard_clips": SHARD,
            "dense_max_gib": args.dense_max_gib,
            "note": (
                "how=arithmetic rows are not run: memory from trak_bytes, time scaled from the largest "
                "measured dense case at the same N (D^3 fit, D^2 prepare); the machine is 2 cores shared "
                "with other jobs (load_avg per row), so times are upper bounds of a quiet machine"
            ),
            "machine": machine_info(),
            "rows": rows,
        },
    )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
