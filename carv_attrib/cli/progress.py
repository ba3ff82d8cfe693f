"""Rich progress on stderr for the per-clip stages (clips/s and failures), off when not a TTY."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from carv_attrib.cli.common import err_console, state


class ClipProgress:
    """A context manager whose `__call__(event, info)` is the pipeline's progress callback."""

    def __init__(self, label: str):
        self.label = label
        self.failures = 0
        self.done = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[failures]} failed"),
            TimeElapsedColumn(),
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
            if info.get("skipped"):
                err_console.print(f"resuming: {info['skipped']} of {info['shards']} shards already done")
        elif event == "clip" and self.task is not None:
            self.done += 1
            if info["status"] != "ok":
                self.failures += 1
            speed = self.progress.tasks[self.task].speed
            self.progress.update(
                self.task, advance=1, failures=self.failures, rate=f"{speed:.2f} clips/s" if speed else ""
            )
