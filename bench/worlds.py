"""Build the LDS world suite (`carv_attrib.lds.world.WORLD_SUITE`) under bench/_work/worlds.

Each world is seeded and described in WORK/NAME/world.json (spec + a one-line description); the
suite's specs, descriptions, build seconds and training losses go to bench/results/worlds.json.

.venv/bin/python bench/worlds.py [NAME ...]     # all of them by default; resumes
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _util import machine_info

from carv_attrib.lds.world import WORLD_SUITE, build_world
from carv_attrib.pipeline.encode import run_encode
from carv_attrib.store.shards import read_json

WORK = Path(__file__).resolve().parent / "_work" / "worlds"
OUT = Path(__file__).resolve().parent / "results" / "worlds.json"


def summary(name: str, seconds: float | None) -> dict:
    root = WORK / name
    full = read_json(root / "models" / "full" / "gt.json")
    spec = read_json(root / "world.json")
    return {
        "spec": {k: v for k, v in spec.items() if k != "description"},
        "description": spec["description"],
        "init": read_json(root / "init.json"),
        "full_model_train_loss_first_last": full["train_loss"],
        "full_model_query_loss_mean": sum(full["query_loss"]) / len(full["query_loss"]),
        "build_seconds": seconds,
    }


def main() -> None:
    names = sys.argv[1:] or [w.name for w in WORLD_SUITE]
    doc = json.loads(OUT.read_text()) if OUT.exists() else {"worlds": {}}
    by_name = {w.name: w for w in WORLD_SUITE}
    for spec in [by_name[n] for n in names]:
        t0 = time.monotonic()
        build_world(
            spec,
            WORK / spec.name,
            workers=2,
            say=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True),
            encode=run_encode,
        )
        seconds = time.monotonic() - t0
        print(f"[{time.strftime('%H:%M:%S')}] {spec.name}: built in {seconds:.0f} s", flush=True)
        old = doc["worlds"].get(spec.name, {}).get("build_seconds")
        doc["worlds"][spec.name] = summary(spec.name, seconds if seconds > 60 or old is None else old)
        doc["machine"] = machine_info()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
