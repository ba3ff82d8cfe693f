"""Small helpers shared by bench/featurize_speed.py and bench/encode_speed.py: timing, machine info, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages (other jobs on the machine show up here)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def wait_for_quiet(max_load: float, max_wait_s: float, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Wait (up to max_wait_s) until the 1-minute load average is below max_load; report what happened."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait_s:
        if time.monotonic() - t0 < 1:
            say(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting up to {max_wait_s:.0f} s")
        time.sleep(5)
    load = os.getloadavg()[0]
    return {
        "waited_s": round(time.monotonic() - t0, 1),
        "load_1min": round(load, 2),
        "quiet": load <= max_load,
    }


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stats(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    """median / min / all runs of a list of timings, each multiplied by `scale`."""
    xs = [v * scale for v in values]
    return {"median": statistics.median(xs), "min": min(xs), "runs": xs}


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON through a temporary file (never a half-written result)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
