"""Motion attribution (Motive's loss-space motion mask) against appearance-only attribution: does
`--objective motion` rank training clips that move like the query higher?

Worlds: the demo's synthetic clips (one shape of a colour moving left/right/up/down over a plain
background; the caption says which). Per world (data seed w): N training clips, the demo's tiny
Wan2.1 pipeline trained on them for the demo's 150 steps, and Q held-out clips of the same kind
(another data seed) as queries, each scored with its own caption as prompt. One encode with
`--motion-masks`, then per estimator seed s (it seeds both the draws and the projection) two
featurizes of the same latents, side by side: `--objective uniform` and `--objective motion`, with
the demo's settings otherwise (K = 8 stratified-is draws, kron projection, cosine Flat index).

Metric: precision@k of motion direction, the share of a query's top-k training clips that move in
the query's direction (chance = that direction's share of the training clips), and, beside it,
precision@k of appearance (same colour and shape) to show what the objective trades away. Error
bars: the standard error over queries within each (world, seed), and the spread over (world, seed)
cells; the paired difference motion − uniform is reported per cell and overall.

    .venv/bin/python bench/motion.py                      # -> bench/results/motion.json
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

from _util import machine_info, write_json  # noqa: E402

from carv_attrib.lds.synthetic import clip_specs, make_demo_data  # noqa: E402
from carv_attrib.models.tiny import make_model  # noqa: E402
from carv_attrib.models.train import TrainConfig, train_transformer  # noqa: E402
from carv_attrib.pipeline.encode import EncodeConfig, run_encode  # noqa: E402
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize  # noqa: E402
from carv_attrib.pipeline.index import IndexConfig, build_run_index  # noqa: E402
from carv_attrib.pipeline.score import ScoreConfig, run_score  # noqa: E402

QUERY_SEED_OFFSET = 1000  # held-out queries: another data seed, so other starts, sizes and combinations


def _world(work: Path, w: int, n_train: int, n_query: int, train_steps: int) -> tuple[Path, Path, Path, dict]:
    """Model trained on the world's clips, its encoded run (with motion maps), the queries' prompts
    file, and {vid: spec} of the training clips."""
    root = work / f"world{w}"
    model, data, qdata, run = root / "model", root / "data", root / "queries", root / "run"
    if not (model / "model_index.json").exists():
        make_model(str(model), "tiny", seed=w)
    manifest = make_demo_data(data, clips=n_train, seed=w)
    make_demo_data(qdata, clips=n_query, seed=w + QUERY_SEED_OFFSET)
    run_encode(
        EncodeConfig(
            manifest=manifest, videos=data / "videos", model=str(model), run=run, frames=17, size="64x64",
            fps=8, workers=1, device="cpu", shard_size=16, motion_masks=True,
        )
    )  # fmt: skip
    trained = root / ".trained"
    if train_steps and not trained.exists():
        losses = train_transformer(
            TrainConfig(run=run, model=str(model), steps=train_steps, seed=w, out=model / "transformer")
        )
        trained.write_text(f"{losses[0]:.4f} -> {losses[-1]:.4f}\n")
    specs = {s.vid: s for s in clip_specs(n_train, seed=w)}
    qspecs = clip_specs(n_query, seed=w + QUERY_SEED_OFFSET)
    prompts = root / "prompts.json"
    prompts.write_text(
        json.dumps({str((qdata / "videos" / f"{s.vid}.mp4").resolve()): s.caption for s in qspecs})
    )
    return model, run, prompts, {"train": specs, "query": {s.vid: s for s in qspecs}}


def _precisions(doc: dict, specs: dict, ks: list[int]) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {
        "direction": {k: [] for k in ks},
        "appearance": {k: [] for k in ks},
    }
    for q in doc["queries"]:
        if q["status"] != "ok":
            raise RuntimeError(f"query {q['path']} failed: {q.get('error')}")
        qs = specs["query"][Path(q["path"]).stem]
        hits = [specs["train"][r["vid"]] for r in q["results"]]
        for k in ks:
            top = hits[:k]
            out["direction"][k].append(sum(h.direction == qs.direction for h in top) / k)
            out["appearance"][k].append(sum((h.color, h.shape) == (qs.color, qs.shape) for h in top) / k)
    return out


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2, help="estimator/projection seeds per world")
    ap.add_argument("--train", type=int, default=48, help="training clips per world")
    ap.add_argument("--queries", type=int, default=16, help="held-out query clips per world")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--work", type=Path, default=Path("bench/_work/motion"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/motion.json"))
    args = ap.parse_args()

    t0 = time.monotonic()
    cells = []
    for w in range(args.worlds):
        model, run, prompts, specs = _world(args.work, w, args.train, args.queries, args.train_steps)
        directions = [s.direction for s in specs["train"].values()]
        chance = statistics.fmean(
            directions.count(q.direction) / len(directions) for q in specs["query"].values()
        )
        for s in range(args.seeds):
            cell: dict = {"world": w, "seed": s, "chance_direction": chance}
            for objective in ("uniform", "motion"):
                orun = args.work / f"world{w}" / f"run-{objective}-s{s}"
                if orun.exists():
                    shutil.rmtree(orun)
                shutil.copytree(run, orun, ignore=shutil.ignore_patterns("features", "index"))
                run_featurize(
                    FeaturizeConfig(
                        run=orun,
                        model=str(model),
                        draws=args.draws,
                        seed=s,
                        objective=objective,
                        batch_clips=4,
                        device="cpu",
                    )  # fmt: skip
                )
                build_run_index(IndexConfig(run=orun, precondition="cosine"))
                doc = run_score(
                    ScoreConfig(
                        run=orun, queries=[], prompts_file=prompts, top_k=max(args.k), workers=1, device="cpu"
                    )  # fmt: skip
                )
                prec = _precisions(doc, specs, args.k)
                cell[objective] = {
                    what: {str(k): dict(zip(("mean", "se"), _mean_se(v))) for k, v in by_k.items()}
                    for what, by_k in prec.items()
                }
                cell[objective]["per_query_direction"] = {str(k): v for k, v in prec["direction"].items()}
                shutil.rmtree(orun)
            for k in args.k:
                d = [m - u for m, u in zip(cell["motion"]["per_query_direction"][str(k)],
                                           cell["uniform"]["per_query_direction"][str(k)])]  # fmt: skip
                cell.setdefault("paired_direction_gain", {})[str(k)] = dict(zip(("mean", "se"), _mean_se(d)))
            cells.append(cell)
            print(json.dumps({k: v for k, v in cell.items() if k not in ("uniform", "motion")}), flush=True)

    summary = {}
    for k in map(str, args.k):
        row = {}
        for objective in ("uniform", "motion"):
            for what in ("direction", "appearance"):
                vals = [c[objective][what][k]["mean"] for c in cells]
                row[f"{objective}_{what}"] = dict(zip(("mean", "se_cells"), _mean_se(vals)))
        gains = [c["paired_direction_gain"][k]["mean"] for c in cells]
        row["direction_gain"] = dict(zip(("mean", "se_cells"), _mean_se(gains)))
        row["cells_motion_better"] = sum(g > 0 for g in gains)
        summary[k] = row
    write_json(
        args.out,
        {
            "bench": "motion",
            "command": "python " + " ".join(sys.argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "chance_direction": statistics.fmean(c["chance_direction"] for c in cells),
            "summary": summary,
            "cells": cells,
            "seconds": round(time.monotonic() - t0, 1),
            "machine": machine_info(),
        },
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
