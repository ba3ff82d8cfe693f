"""`carv-attrib make-model` and `make-demo-data`: the embedded default model and dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carv_attrib.cli.common import handle_errors, say
from carv_attrib.config import parse_size
from carv_attrib.errors import UsageError

Seed = Annotated[int, typer.Option("--seed", help="The one seed every random quantity derives from.")]


@handle_errors
def make_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the diffusers pipeline to.")],
    preset: Annotated[
        str,
        typer.Option(
            "--preset", help="tiny (~28 k params, tests) | small (~4.9 M, benchmarks) | medium (~20 M)."
        ),
    ] = "tiny",
    seed: Seed = 0,
) -> None:
    """Build a Wan2.1 T2V pipeline from the real diffusers classes with random weights and save it
    in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers."""
    from carv_attrib.models.tiny import SIZES
    from carv_attrib.models.tiny import make_model as build

    if preset not in SIZES:
        raise UsageError(f"--preset {preset}: choose one of {', '.join(SIZES)}")
    counts = build(str(out_dir), size=preset, seed=seed)
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    say(f"wrote {preset} Wan2.1 pipeline to {out_dir} (parameters: {parts})", style="green")


@handle_errors
def make_demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Directory for videos/ and manifest.json.")],
    clips: Annotated[int, typer.Option("--clips", "-n", help="Number of clips.")] = 24,
    seed: Seed = 0,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 24,
    size: Annotated[
        str, typer.Option("--size", metavar="WxH", help="Frame size WxH of the clips.")
    ] = "96x80",
    fps: Annotated[float, typer.Option(help="Frame rate of the clips.")] = 8.0,
) -> None:
    """Write N real H.264 clips of moving shapes with matching captions and a VidGen-style manifest."""
    from carv_attrib.lds.synthetic import make_demo_data as build

    if clips < 1:
        raise UsageError("--clips must be >= 1")
    w, h = parse_size(size)
    manifest = build(out_dir, clips=clips, seed=seed, frames=frames, width=w, height=h, fps=fps)
    say(f"wrote {clips} clips to {out_dir}/videos and the manifest {manifest}", style="green")
