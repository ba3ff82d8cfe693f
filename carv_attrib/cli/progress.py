"""Rich progress on stderr for the stages (items/s, failures, elapsed and remaining time), off when
not a TTY or under --quiet.

The rate is work done over time elapsed since the stage started (`WorkRate`): items the stage only
passes over (`"skipped": True`, e.g. a failed query's featurize step) advance the bar but are not
work, and no rate (nor remaining time) is shown before `MIN_RATE_S` seconds. Rich's own speed, a
window over the last updates, read "47195 clips/s" when a VAE batch reported its clips at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from carv_attrib.cli.common import err_console, state

MIN_RATE_S = 2.0  # seconds of work before a rate is shown: one batch's burst is not a rate


class WorkRate:
    """Items of work per second since `start()`; None before MIN_RATE_S seconds or any work."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.t0: float | None = None
        self.work = 0

    def start(self) -> None:
        self.t0 = self.clock()

    def add(self, skipped: bool = False) -> None:
        if not skipped:
            self.work += 1

    def per_s(self) -> float | None:
        if self.t0 is None or self.work == 0:
            return None
        elapsed = self.clock() - self.t0
        return self.work / elapsed if elapsed >= MIN_RATE_S else None

    def remaining_s(self, items: float) -> float | None:
        """Seconds for `items` more items at the rate so far; None while there is no rate."""
        rate = self.per_s()
        return items / rate if rate else None


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ClipProgress:
    """A context manager whose `__call__(event, info)` is the pipeline's progress callback."""

    def __init__(self, label: str, unit: str = "clips", clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.unit = unit
        self.failures = 0
        self.done = 0
        self.rate = WorkRate(clock)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[failures]} failed"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=err_console,
            disable=state.quiet or not err_console.is_terminal,
            transient=False,
        )
        self.task: Any = None

    def __enter__(self) -> ClipProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def fields(self) -> dict[str, str]:
        """The rate and eta texts as shown now."""
        rate = self.rate.per_s()
        task = self.progress.tasks[self.task]
        left = max(0.0, (task.total or 0) - task.completed)
        return {
            "rate": f"{rate:.2f} {self.unit}/s" if rate else "",
            "eta": _clock_text(self.rate.remaining_s(left)),
        }

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "start":
            self.rate.start()
            self.task = self.progress.add_task(
                self.label, total=info["todo"], failures=0, rate="", eta=_clock_text(None)
            )
        elif event == "explain" and self.task is not None:  # more steps: `score --explain`'s clips
            self.progress.update(self.task, total=self.progress.tasks[self.task].total + info["todo"])
        elif event in ("clip", "step") and self.task is not None:  # "step": finetune's optimizer steps
            self.done += 1
            if info["status"] != "ok":
                self.failures += 1
            self.rate.add(skipped=bool(info.get("skipped")))
            self.progress.update(self.task, advance=1, failures=self.failures)
            self.progress.update(self.task, **self.fields())
