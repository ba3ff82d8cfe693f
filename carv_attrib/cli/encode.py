"""`carv-attrib encode`: decode + VAE-encode + embed captions once per clip, into RUN/latents."""

from __future__ import annotations

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, handle_errors
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import EncodeConfig
from carv_attrib.errors import PartialRun


@handle_errors
@stage_command(EncodeConfig, extra=[format_param()])
def encode(cfg: EncodeConfig, fmt: str) -> None:
    """Decode and encode every clip of MANIFEST once; cache latents and text embeddings in RUN/latents."""
    from carv_attrib.pipeline.encode import run_encode

    fmt = check_format(fmt)
    try:
        with ClipProgress("encode") as progress:
            summary = run_encode(cfg, progress, check_failures=True)
    except PartialRun as exc:  # too many failures: the summary is shown, then handle_errors exits 3
        _show(exc.summary, cfg, fmt)
        raise
    _show(summary, cfg, fmt)


def _show(summary: object, cfg: EncodeConfig, fmt: str) -> None:
    emit(summary.to_dict(), fmt) if fmt != "human" else render.encode(summary, cfg.shard, cfg.run)
