"""What every library job shares: the progress callback type and the RUN/run.json record.

The stage functions (`run_encode`, `featurize_and_index`, `run_index`, `run_plan`) record their own
invocation, so a library user gets the same provenance as the CLI.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carv_attrib import __version__

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict[str, Any]], None]
"""progress(event, info): "plan", "start", "clip", "shard", "parts", "part" … with a dict of counts."""

RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "faiss-cpu", "pyarrow", "decord")


def noop(event: str, info: dict[str, Any]) -> None:
    """The default progress callback: ignores every event."""


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """{distribution: installed version, or None when not installed}."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def record(
    run: Path | str, command: str, device: str | None = None, started: float | None = None, **extra: Any
) -> None:
    """Append one invocation to RUN/run.json: command, argv, versions, host, device, finish time and
    `seconds` since `started` (a `time.monotonic()` value), plus `extra` as given (JSON-able).
    Never raises for an unwritable run dir: a finished job must not turn into a failure (a warning
    is logged instead)."""
    from carv_attrib.data.store import now_iso, record_invocation

    entry = {
        "command": command,
        "argv": sys.argv,
        "tool_version": __version__,
        "python": platform.python_version(),
        "versions": package_versions(RECORDED_PACKAGES),
        "host": platform.node(),
        "device": device,
        "finished_at": now_iso(),
        "seconds": round(time.monotonic() - started, 3) if started is not None else None,
        **extra,
    }
    try:
        record_invocation(Path(run), entry)
    except OSError:
        log.warning("could not append to %s/run.json", run)
