"""`carv-attrib demo [DIR]`: the whole loop on the embedded tiny model and synthetic data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from carv_attrib.cli.common import Seed, err_console, handle_errors, record_run
from carv_attrib.cli.score import render_table


@handle_errors
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the model, data, run and results.")] = Path(
        "demo-run"
    ),
    clips: Annotated[int, typer.Option("--clips", "-n", help="Synthetic training clips.")] = 24,
    train_steps: Annotated[
        int, typer.Option("--train-steps", help="Flow-matching steps before attribution (0: none).")
    ] = 150,
    draws: Annotated[int, typer.Option("--draws", "-K")] = 8,
    frames: Annotated[int, typer.Option("--frames")] = 17,
    size: Annotated[int, typer.Option("--size", help="Square encode size (multiple of 16).")] = 64,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    precondition: Annotated[str, typer.Option("--precondition")] = "cosine",
    plan_pilot: Annotated[
        int, typer.Option("--plan-pilot", help="Pilot clips for `plan` (0: skip the plan).")
    ] = 4,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Caption to generate (default: the first clip's).")
    ] = None,
    seed: Seed = 0,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "cpu",
) -> None:
    """Build a tiny Wan2.1 pipeline and synthetic clips, encode, train briefly, plan, featurize, generate
    a video with WanPipeline, and attribute it: top-k table on stdout, JSON in DIR/attribution.json."""
    from carv_attrib.pipeline.demo import DemoConfig, run_demo

    started = time.monotonic()
    cfg = DemoConfig(
        out=out_dir,
        clips=clips,
        train_steps=train_steps,
        draws=draws,
        frames=frames,
        width=size,
        height=size,
        top_k=top_k,
        precondition=precondition,
        prompt=prompt,
        seed=seed,
        device=device,
        plan_pilot_clips=plan_pilot,
    )
    result = run_demo(cfg, say=lambda s: err_console.print(f"[bold cyan]demo[/] {s}"))
    record_run(out_dir / "run", "demo", device=device, started=started, timings=result.timings)
    render_table(result.doc)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
    err_console.print(
        f"[green]done[/] in {time.monotonic() - started:.0f} s ({stages}); JSON: {out_dir}/attribution.json, "
        f"video: {out_dir}/generated.mp4"
    )
