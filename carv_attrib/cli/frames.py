"""`carv-attrib frames VIDEO`: the frames encode and score would take from a clip, and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from carv_attrib.atomic import atomic_path
from carv_attrib.cli.common import check_format, emit, handle_errors, out_console, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import FramesConfig
from carv_attrib.errors import EXIT_PARTIAL


@handle_errors
@stage_command(FramesConfig, extra=[format_param()])
def frames(cfg: FramesConfig, fmt: str | None) -> None:
    """Show the timestamps and source frames taken from VIDEO, the decoder and the container facts;
    optionally a contact sheet (--png) or the frames themselves (--npy). Exit 3 when the clip fails."""
    from carv_attrib.video.failures import ClipFailure, failure_message
    from carv_attrib.video.frames import contact_sheet, inspect_frames

    fmt = check_format(fmt)
    cfg.validate()
    rep = inspect_frames(
        cfg.video, cfg.policy, cfg.decoder, with_frames=cfg.png is not None or cfg.npy is not None
    )
    pixels = rep.pop("pixels", None)
    if rep["status"] != "ok":
        rep["error"] = failure_message(ClipFailure(rep["status"], rep["error"] or ""), "frames")
    if pixels is not None and cfg.png is not None:
        rep["png"] = str(contact_sheet(pixels, cfg.png, scale=cfg.scale))
    if pixels is not None and cfg.npy is not None:
        with atomic_path(Path(cfg.npy), need=pixels.nbytes) as tmp, open(tmp, "wb") as f:
            np.save(f, pixels)  # a file object: numpy would add ".npy" to the temporary name
        rep["npy"] = str(cfg.npy)
    if fmt != "human":
        emit(rep, fmt)
    else:
        _render(rep)
    if rep["status"] != "ok":
        raise typer.Exit(EXIT_PARTIAL)


def _render(rep: dict) -> None:
    probe = rep.get("probe") or {}
    facts = ", ".join(f"{k} {v}" for k, v in probe.items() if v not in (None, False, [], ""))
    out_console.print(Text(f"{rep['path']}: {facts}"), soft_wrap=True)
    if rep["status"] != "ok":
        say(f"{rep['status']}: {rep['error']}", style="red")
        return
    why = f" ({'; '.join(rep['reasons'])})" if rep.get("reasons") else ""
    out_console.print(Text(f"decoder {rep['decoder']}{why}"))
    table = Table(title="frames taken (seconds after the first displayed frame)", title_justify="left")
    for col in ("k", "target s", "source frame", "timestamp s"):
        table.add_column(col, justify="right")
    for f in rep["frames"]:
        target = "-" if f["target"] is None else f"{f['target']:.4f}"
        table.add_row(str(f["k"]), target, str(f["index"]), f"{f['timestamp']:.4f}")
    out_console.print(table)
    for key in ("png", "npy"):
        if key in rep:
            say(f"wrote {rep[key]}", style="green")
