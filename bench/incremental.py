"""What a grown run costs: encode + featurize + index of a manifest with +10 % clips, incrementally
(the run already holds the other 90 %) against from scratch, side by side in one process.

Both sides run the same library calls with the same settings (the `small` Wan2.1 pipeline, random
weights: timings do not depend on the weights; 17 frames at 64x64; K = 8 stratified-is draws; VAE
batch 4, 2 decode workers, 4 clips per backward; cosine Flat index) on the same final manifest. The
incremental side starts from a finished run of the base manifest (its cost is not counted), then
runs the three stages on the grown manifest; then the same command once more with nothing changed
(what checking a run costs: stat + cached hashes, no model load). Each side is repeated `--repeats` times (fresh run
directories; medians reported). The index is rebuilt over all clips on both sides: its cost does not
shrink with the increment.

    .venv/bin/python bench/incremental.py                 # -> bench/results/incremental.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402

from carv_attrib.lds.synthetic import make_demo_data  # noqa: E402
from carv_attrib.models.tiny import make_model  # noqa: E402
from carv_attrib.pipeline.encode import EncodeConfig, run_encode  # noqa: E402
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize  # noqa: E402
from carv_attrib.pipeline.index import IndexConfig, build_run_index  # noqa: E402


def stages(manifest: Path, videos: Path, model: Path, run: Path, draws: int) -> dict[str, float]:
    """Seconds of encode, featurize and index on `run` for `manifest`, and the clips each computed."""
    out: dict[str, float] = {}
    t = time.monotonic()
    enc = run_encode(
        EncodeConfig(
            manifest=manifest, videos=videos, model=str(model), run=run, frames=17, size="64x64",
            fps=8, batch_size=4, workers=2, device="cpu",
        )
    )  # fmt: skip
    out["encode_s"], out["encoded"] = time.monotonic() - t, enc.encoded
    t = time.monotonic()
    feat = run_featurize(FeaturizeConfig(run=run, model=str(model), draws=draws, batch_clips=4, device="cpu"))
    out["featurize_s"], out["featurized"] = time.monotonic() - t, feat.computed
    t = time.monotonic()
    info = build_run_index(IndexConfig(run=run))
    out["index_s"], out["indexed"] = time.monotonic() - t, info.count
    out["total_s"] = out["encode_s"] + out["featurize_s"] + out["index_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=40, help="clips in the run before it grows")
    ap.add_argument("--grow", type=float, default=0.10, help="share of clips added")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/incremental"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/incremental.json"))
    args = ap.parse_args()

    added = max(1, round(args.base * args.grow))
    work = args.work
    model, data = work / "model", work / "data"
    if not (model / "model_index.json").exists():
        make_model(str(model), "small", seed=0)
    if not (data / "manifest.json").exists():
        make_demo_data(data, clips=args.base + added, seed=0)
    rows = json.loads((data / "manifest.json").read_text())
    base_manifest, grown_manifest = work / "base.json", work / "grown.json"
    base_manifest.write_text(json.dumps(rows[: args.base]))
    grown_manifest.write_text(json.dumps(rows[: args.base + added]))

    load_start = load_avg()
    sides: dict[str, list[dict[str, float]]] = {"from_scratch": [], "incremental": [], "unchanged_rerun": []}
    for r in range(args.repeats):
        for side in ("from_scratch", "incremental"):  # interleaved: drift hits both sides alike
            run = work / f"run-{side}-{r}"
            shutil.rmtree(run, ignore_errors=True)
            if side == "incremental":
                stages(base_manifest, data / "videos", model, run, args.draws)  # not counted
            res = stages(grown_manifest, data / "videos", model, run, args.draws)
            sides[side].append(res)
            print(side, r, {k: round(v, 2) for k, v in res.items()}, flush=True)
            if side == "incremental":  # the same command again: what checking an unchanged run costs
                res = stages(grown_manifest, data / "videos", model, run, args.draws)
                sides["unchanged_rerun"].append(res)
                print("unchanged_rerun", r, {k: round(v, 2) for k, v in res.items()}, flush=True)
            shutil.rmtree(run, ignore_errors=True)

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in sides[side])

    keys = ("encode_s", "featurize_s", "index_s", "total_s")
    summary = {
        side: {k: round(med(side, k), 3) for k in keys} | {
            "encoded": sides[side][0]["encoded"], "featurized": sides[side][0]["featurized"],
            "indexed": sides[side][0]["indexed"],
        }
        for side in sides
    }  # fmt: skip
    ratio = {k: round(med("incremental", k) / med("from_scratch", k), 3) for k in keys}
    # Fixed cost of a stage that has work (model load, decode workers), from the two sides' medians:
    # t = fixed + per_clip * clips, solved with from_scratch (base + added) and incremental (added).
    n_all, n_add = args.base + added, added
    per_clip = {
        k: (med("from_scratch", k) - med("incremental", k)) / (n_all - n_add)
        for k in ("encode_s", "featurize_s")
    }
    fixed = {k: med("incremental", k) - per_clip[k] * n_add for k in per_clip}
    doc = {
        "benchmark": "incremental",
        "config": {
            "base_clips": args.base, "added_clips": added, "model_size": "small", "frames": 17,
            "size": "64x64", "draws": args.draws, "repeats": args.repeats, "batch_size": 4, "workers": 2,
            "batch_clips": 4, "index": "Flat, cosine", "unit": "median seconds over repeats",
        },
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "median": summary,
        "incremental_over_scratch": ratio,
        "fit_fixed_plus_per_clip": {
            k: {"fixed_s": round(fixed[k], 3), "per_clip_s": round(per_clip[k], 4)} for k in per_clip
        },
        "runs": sides,
    }  # fmt: skip
    print(json.dumps({"median": summary, "incremental_over_scratch": ratio}, indent=1))
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
