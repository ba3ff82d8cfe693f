"""`carv-attrib finetune`: adapt MODEL's transformer (or a LoRA adapter) to RUN's cached clips."""

from __future__ import annotations

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, handle_errors
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import FinetuneConfig


@handle_errors
@stage_command(FinetuneConfig, extra=[format_param()], run_json=False)
def finetune(cfg: FinetuneConfig, fmt: str) -> None:
    """Fine-tune MODEL on RUN's cached latents (flow matching) into OUT, resumably; MODEL is never written."""
    from carv_attrib.pipeline.finetune import run_finetune

    fmt = check_format(fmt)
    with ClipProgress("finetune", unit="steps") as progress:
        summary = run_finetune(cfg, progress)
    emit(summary.to_dict(), fmt) if fmt != "human" else render.finetune(summary)
