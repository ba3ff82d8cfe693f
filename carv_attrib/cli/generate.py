"""`carv-attrib generate PROMPT -m MODEL -o OUT.mp4`: a query video from the model's own WanPipeline."""

from __future__ import annotations

from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import GenerateConfig


@handle_errors
@stage_command(GenerateConfig, extra=[format_param()])
def generate(cfg: GenerateConfig, fmt: str | None) -> None:
    """Generate a video for PROMPT with MODEL's WanPipeline and write it as MP4 (a query for `score`)."""
    from carv_attrib.pipeline.generate import run_generate

    fmt = check_format(fmt)
    path = run_generate(cfg)
    info = {
        "video": str(path),
        "prompt": cfg.prompt,
        "model": cfg.model,
        "frames": cfg.frames,
        "size": cfg.size,
    }
    if fmt != "human":
        emit(info, fmt)
    else:
        say(f"wrote {path} ({cfg.frames} frames, {cfg.size}) for the prompt: {cfg.prompt}")
