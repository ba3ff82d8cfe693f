"""`carv-attrib evaluate`: LDS of featurize settings on a run, against retrained subset models."""

from __future__ import annotations

from rich.text import Text

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, err_console, handle_errors, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import EvaluateConfig


@handle_errors
@stage_command(EvaluateConfig, extra=[format_param()])
def evaluate(cfg: EvaluateConfig, fmt: str | None) -> None:
    """How faithful are the attributions on RUN? Hold out queries, retrain MODEL on random halves of
    the other clips, and score each --variant setting by LDS with a 95 % CI over subsets, queries and
    seeds (JSON to --out). With --lora DIR, LoRA attribution: the adapter is retrained with DIR's
    finetune recipe on each half, MODEL frozen, and attributed through its A/B gradients."""
    from carv_attrib.pipeline.evaluate import run_evaluate

    fmt = check_format(fmt)
    doc = run_evaluate(cfg, say=lambda s: err_console.print(Text.assemble(("evaluate", "bold cyan"), " ", s)))
    emit(doc, fmt) if fmt != "human" else render.evaluate(doc)
    if fmt == "human":
        say(f"wrote {cfg.out}" + (f" and {cfg.plot}" if cfg.plot else ""), style="green")
