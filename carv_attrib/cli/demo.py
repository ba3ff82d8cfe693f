"""`carv-attrib demo [DIR]`: the whole loop on the embedded tiny model and synthetic data."""

from __future__ import annotations

import time

from rich.text import Text

from carv_attrib.cli import render
from carv_attrib.cli.common import err_console, handle_errors, say
from carv_attrib.cli.options import stage_command
from carv_attrib.config import DemoConfig
from carv_attrib.pipeline._job import record


@handle_errors
@stage_command(DemoConfig, skip=("workers",))
def demo(cfg: DemoConfig) -> None:
    """Build a tiny Wan2.1 pipeline and synthetic clips, encode, train briefly, plan, featurize, generate
    a video with WanPipeline, and attribute it: top-k table on stdout, JSON in DIR/attribution.json."""
    from carv_attrib.pipeline.demo import run_demo

    started = time.monotonic()
    result = run_demo(
        cfg.validate(), say=lambda s: err_console.print(Text.assemble(("demo", "bold cyan"), " ", s))
    )
    record(cfg.out / "run", "demo", device=cfg.device, started=started, timings=result.timings)
    render.score_tables(result.doc)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
    say(
        f"done in {time.monotonic() - started:.0f} s ({stages}); JSON: {cfg.out}/attribution.json, "
        f"video: {cfg.out}/generated.mp4"
    )
