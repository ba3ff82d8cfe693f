"""Rich progress on stderr for the stages (items/s, failures, elapsed and remaining time), off when
not a TTY or under --quiet."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from carv_attrib.cli.common import err_console, state


class ClipProgress:
    """A context manager whose `__call__(event, info)` is the pipeline's progress callback."""

    def __init__(self, label: str, unit: str = "clips"):
        self.label = label
        self.unit = unit
        self.failures = 0
        self.done = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[failures]} failed"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
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

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "start":
            self.task = self.progress.add_task(self.label, total=info["todo"], failures=0, rate="")
        elif event == "explain" and self.task is not None:  # more steps: `score --explain`'s clips
            self.progress.update(self.task, total=self.progress.tasks[self.task].total + info["todo"])
        elif event == "clip" and self.task is not None:
            self.done += 1
            if info["status"] != "ok":
                self.failures += 1
            speed = self.progress.tasks[self.task].speed
            self.progress.update(
                self.task,
                advance=1,
                failures=self.failures,
                rate=f"{speed:.2f} {self.unit}/s" if speed else "",
            )
