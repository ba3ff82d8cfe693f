"""Where LDS is lost: each attribution factor against the exact reference, on every standard world.

For each world of `bench/worlds.py` (built first: `.venv/bin/python bench/worlds.py`), every
variant of `VARIANTS` is scored by LDS (`carv_attrib.evaluate.study`), with a 95 % bootstrap CI over
queries and replicates (projection seed r and estimator seed r, r = 0..2). The exact reference is the
unprojected gradient of all trainable parameters with K = 256 iid draws (common random numbers),
scored by grad-dot (identity).

    .venv/bin/python bench/factors.py              # -> bench/results/factors.json
    .venv/bin/python bench/factors.py base sgd     # some worlds only (merged into the JSON)
    .venv/bin/python bench/factors.py base --only kron-12x12,K32   # some variants only (merged)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _util import load_avg, machine_info

from carv_attrib.evaluate.lds import random_floor
from carv_attrib.evaluate.study import Variant, score_variants
from carv_attrib.evaluate.world import STANDARD_WORLDS, World

WORK = Path(__file__).resolve().parent / "_work" / "worlds"
OUT = Path(__file__).resolve().parent / "results" / "factors.json"


# The shipped default before this study (loss, kron 8x8 per layer); each factor changes it one at a time.
OLD = {
    "output_fn": "loss",
    "kron_dims": "8x8",
    "timesteps": "stratified-is",
    "precondition": "cosine",
    "draws": 8,
}


def V(name: str, **change: object) -> Variant:  # noqa: N802 (a row of the table)
    return Variant(name, **{**OLD, **change})


def variants(density: str) -> list[Variant]:
    """The factor table: the old default and one change at a time (K = 8 unless named), then the
    combinations the single factors point to; `kron-16x16-sqnorm` is the new default."""
    return [
        V("exact-256", kind="exact", draws=256, timesteps="iid", precondition="identity", replicates=1),
        V("exact-256-cosine", kind="exact", draws=256, timesteps="iid", precondition="cosine", replicates=1),
        V("exact-256-adam", kind="exact", draws=256, timesteps="iid", precondition="adam", replicates=1),
        V("exact-8", kind="exact", timesteps="iid", precondition="identity"),
        V("exact-8-adam", kind="exact", timesteps="iid", precondition="adam"),
        V("default"),  # the old default: loss, stratified-is (q = p), kron 8x8 on blocks.*, cosine
        V("iid", timesteps="iid"),
        V("stratified", timesteps="stratified"),
        V("density-matched", density=density),
        V("identity", precondition="identity"),
        V("trak", precondition="trak"),
        V("trak-lambda1", precondition="trak", lambda_rel=1.0),
        V("kron-16x16", kron_dims="16x16"),
        V("kron-32x32", kron_dims="32x32"),
        V("all-linear", layers=("*",)),
        V("sqnorm", output_fn="sqnorm"),
        V("per-clip-noise", noise="per-clip"),
        V("K32", draws=32),
        V("kron-12x12", kron_dims="12x12"),
        V("kron-16x16-iid", kron_dims="16x16", timesteps="iid"),
        V("kron-16x16-stratified", kron_dims="16x16", timesteps="stratified"),
        V("kron-16x16-matched", kron_dims="16x16", density=density),
        V("kron-16x16-sqnorm", kron_dims="16x16", output_fn="sqnorm"),  # the new default
        V("kron-16x16-K4", kron_dims="16x16", draws=4),
        V("kron-16x16-K4-iid", kron_dims="16x16", draws=4, timesteps="iid"),
        V("kron-16x16-sqnorm-iid", kron_dims="16x16", output_fn="sqnorm", timesteps="iid"),
        V("kron-16x16-sqnorm-all-linear", kron_dims="16x16", output_fn="sqnorm", layers=("*",)),
        V("kron-16x16-sqnorm-K4", kron_dims="16x16", output_fn="sqnorm", draws=4),
        V("kron-16x16-sqnorm-K4-iid", kron_dims="16x16", output_fn="sqnorm", draws=4, timesteps="iid"),
        V("kron-16x16-sqnorm-trak", kron_dims="16x16", output_fn="sqnorm", precondition="trak"),
    ]


def main() -> None:
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only, args = set(args[i + 1].split(",")), args[:i] + args[i + 2 :]
    names = args or [w.name for w in STANDARD_WORLDS]
    doc = json.loads(OUT.read_text()) if OUT.exists() else {"worlds": {}}
    for spec in STANDARD_WORLDS:
        if spec.name not in names:
            continue
        world = World(spec, WORK / spec.name)
        t0 = time.monotonic()
        todo = [v for v in variants(spec.density) if only is None or v.name in only]
        rows = score_variants(world.problem(), todo, say=lambda s: print(s, flush=True))
        old = doc["worlds"].get(spec.name, {}).get("variants", {})
        merged = {
            v.name: rows.get(v.name, old.get(v.name))
            for v in variants(spec.density)
            if v.name in rows or v.name in old
        }
        doc["worlds"][spec.name] = {
            "spec": spec.to_dict(),
            "random": random_floor(world.gt_values(), world.subset_positions(), spec.n_train),
            "variants": merged,
            "seconds": time.monotonic() - t0,
        }
        doc["machine"], doc["load_avg"] = machine_info(), load_avg()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
