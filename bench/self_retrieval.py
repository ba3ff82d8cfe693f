"""Does a training clip find itself? Self-retrieval per preconditioner on the demo run.

Every training clip of `carv-attrib demo` (24 clips, the tiny Wan2.1 trained 150 steps) is scored as a
query with its own caption against the run's index, rebuilt once per preconditioner from the same
features (`index --precondition X`: no gradients recomputed); counts how often the clip itself is
rank 1 and in the top 3. README quotes it beside the LDS study: a preconditioner's LDS and whether an
exact copy ranks first are different properties.

    .venv/bin/python bench/self_retrieval.py    # ~4 min -> bench/results/self_retrieval.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _util import machine_info

from carv_attrib.config import IndexConfig, ScoreConfig
from carv_attrib.pipeline.index import build_run_index
from carv_attrib.pipeline.score import run_score

WORK = Path(__file__).resolve().parent / "_work" / "self_retrieval"
OUT = Path(__file__).resolve().parent / "results" / "self_retrieval.json"
KINDS = ("normalize", "cosine", "identity", "trak")


def main() -> None:
    demo = WORK / "demo-run"
    if not (demo / "run" / "index").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("carv-attrib")
        subprocess.run([str(exe), "demo", str(demo)], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((demo / "data" / "manifest.json").read_text())
    prompts = WORK / "prompts.json"
    videos = demo / "data" / "videos"
    prompts.write_text(json.dumps({str(videos / f"{r['vid']}.mp4"): r["caption"] for r in manifest}))
    doc: dict = {"clips": len(manifest), "top_k": 3, "preconditioners": {}}
    for kind in KINDS:
        t0 = time.monotonic()
        build_run_index(IndexConfig(run=demo / "run", precondition=kind))
        out = run_score(
            ScoreConfig(run=demo / "run", queries=[], prompts_file=prompts, top_k=3, device="cpu")
        )
        ranks = []
        for q in out["queries"]:
            vids = [r["vid"] for r in q["results"]]
            ranks.append(vids.index(Path(q["path"]).stem) + 1 if Path(q["path"]).stem in vids else None)
        doc["preconditioners"][kind] = {
            "self_at_1": sum(r == 1 for r in ranks),
            "self_in_top3": sum(r is not None for r in ranks),
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(kind, doc["preconditioners"][kind], flush=True)
    doc["machine"] = machine_info()
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
