"""The library jobs from Python, as the CLI runs them: encode, featurize + index, score.

After `make demo` (which leaves `demo-run/` with its clips, its trained model and a generated video):

    .venv/bin/python examples/python_api.py demo-run

encodes the demo clips into a new run `demo-run/api-run`, featurizes and indexes them, scores the demo's
generated video and prints its top 3 with their percentiles (the demo's own index also used its
plan's proposal, so the scores differ a little from the demo's). Each job records itself in
`api-run/run.json`. The `__main__` guard is required: encode's decode workers are processes, and a
script without it would be re-imported by each of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carv_attrib.config import EncodeConfig, FeaturizeConfig, ScoreConfig
from carv_attrib.pipeline.encode import run_encode
from carv_attrib.pipeline.featurize import featurize_and_index
from carv_attrib.pipeline.score import run_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a `carv-attrib demo` directory (make demo: demo-run)")
    ap.add_argument("--model", type=Path, help="default: DEMO/model")
    ap.add_argument("--data", type=Path, help="clips and manifest.json; default: DEMO/data")
    ap.add_argument("--query", type=Path, help="default: DEMO/generated.mp4")
    ap.add_argument("--prompt", help="default: the prompt in DEMO/attribution.json")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="64x64", help="WxH, as the demo encodes")
    args = ap.parse_args()
    model = str(args.model or args.demo / "model")
    data = args.data or args.demo / "data"
    query = args.query or args.demo / "generated.mp4"
    prompt = args.prompt or json.loads((args.demo / "attribution.json").read_text())["queries"][0]["prompt"]
    run = args.demo / "api-run"

    encode = EncodeConfig(
        manifest=data / "manifest.json",
        videos=data / "videos",
        model=model,
        run=run,
        frames=args.frames,
        size=args.size,
        fps=8,
        device="cpu",
    )
    summary = run_encode(encode, check_failures=True)  # PartialRun past max_failure_rate (CLI: exit 3)
    print(f"encoded {summary.ok}/{summary.total} clips")
    done = featurize_and_index(FeaturizeConfig(run=run, model=model, device="cpu"))
    print(f"featurized {done.summary.computed} clips; index: {done.index.count} clips, dim {done.index.dim}")
    doc = run_score(ScoreConfig(run=run, queries=[query], prompt=prompt, top_k=3, device="cpu"))
    for r in doc["queries"][0]["results"]:
        print(f"{r['rank']}  {r['vid']}  score {r['score']:.6g}  pctl {r['percentile']:.1f}  {r['caption']}")


if __name__ == "__main__":
    main()
