"""`carv-attrib plan`: measure costs and variances on a pilot; fit the proposal q(σ)."""

from __future__ import annotations

from typing import Any

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import PlanConfig


@handle_errors
@stage_command(PlanConfig, extra=[format_param()])
def plan(cfg: PlanConfig, fmt: str) -> None:
    """Pilot CARV's accounting on RUN: c_enc, c_draw, per-σ gradient moments, the fitted proposal q,
    within-encode variance per scheme, ECM against fresh-encode iid K=1, and a recommended K."""
    from carv_attrib.pipeline.plan import run_plan

    fmt = check_format(fmt)
    with ClipProgress("plan", unit="steps") as bar:

        def progress(event: str, info: dict[str, Any]) -> None:
            if event == "cost":  # before the pilot starts: its size and time, and how to trim it
                say(render.plan_cost(info, cfg.dry_run))
            else:
                bar(event, info)

        doc = run_plan(cfg, progress)
    if doc.get("dry_run"):
        if fmt != "human":
            emit(doc, fmt)
        return
    emit(doc, fmt) if fmt != "human" else render.plan(doc, cfg.draws, cfg.k_max)
