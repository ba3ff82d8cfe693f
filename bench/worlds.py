"""Build the standard LDS worlds (`carv_attrib.evaluate.world.STANDARD_WORLDS`) under bench/_work/worlds.

.venv/bin/python bench/worlds.py [NAME ...]     # all four by default; resumes
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from carv_attrib.evaluate.world import STANDARD_WORLDS, build_world

WORK = Path(__file__).resolve().parent / "_work" / "worlds"


def main() -> None:
    names = sys.argv[1:] or [w.name for w in STANDARD_WORLDS]
    for spec in STANDARD_WORLDS:
        if spec.name not in names:
            continue
        t0 = time.monotonic()
        build_world(
            spec,
            WORK / spec.name,
            workers=2,
            say=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True),
        )
        print(
            f"[{time.strftime('%H:%M:%S')}] {spec.name}: built in {time.monotonic() - t0:.0f} s", flush=True
        )


if __name__ == "__main__":
    main()
