"""What every library job shares: the progress callback type, the RUN/run.json record and the Ray
parts driver.

The stage functions (`run_encode`, `featurize_and_index`, `run_index`, `run_plan`) record their own
invocation, so a library user gets the same provenance as the CLI; `run_in_parts` is `--executor
ray` for encode and featurize.
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
    from carv_attrib.store.shards import now_iso, record_invocation

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


def run_in_parts(
    stage: Callable[..., Any],
    cfg: Any,
    prepare: Callable[[], None],
    part_info: Callable[[Any], dict[str, Any]],
    merge: Callable[[Any, list[Any]], None],
    progress: ProgressFn = noop,
) -> Any:
    """`--executor ray` for a stage: its N parts (`--shard I/N`, N = cfg.parts or one per GPU/node)
    run as Ray tasks (`ray_exec.run_parts`), then a local pass of `stage` does what a part could not.

    cfg: the stage config, its paths already absolute (workers on other nodes start elsewhere);
    prepare(): creates the stage on disk, inside the Ray session (an unreachable cluster is refused
    before any write); part_info(summary): the counts of a finished part's "part" event;
    merge(final, parts): folds the parts' summaries into the final pass's. Returns the final summary
    with `seconds` of the whole. Raises UsageError (exit 2) when Ray is missing or unreachable.
    """
    import dataclasses

    from carv_attrib.pipeline.ray_exec import default_parts, ray_session, run_parts

    t0 = time.monotonic()
    with ray_session(cfg.ray_address) as ray:
        prepare()
        n = cfg.parts or default_parts(ray)
        parts = [
            dataclasses.replace(cfg, shard=f"{i}/{n}", executor="local", overwrite=False, lock_held=True)
            for i in range(n)
        ]
        progress("parts", {"parts": n})
        done = run_parts(
            stage, parts, ray, on_done=lambda i, s: progress("part", {"part": i, **part_info(s)})
        )
    final = stage(dataclasses.replace(cfg, executor="local", overwrite=False), progress)
    merge(final, done)
    final.seconds = round(time.monotonic() - t0, 3)
    return final
