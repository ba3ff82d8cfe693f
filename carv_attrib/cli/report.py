"""`carv-attrib report ATTRIBUTION.json -o report.html`: the attribution as one self-contained page."""

from __future__ import annotations

from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import ReportConfig


@handle_errors
@stage_command(ReportConfig, extra=[format_param()])
def report(cfg: ReportConfig, fmt: str | None) -> None:
    """Write one self-contained HTML page: each query's frames beside its top-k training clips (frames,
    vid, caption, score ± se on the query's axis), a plain-words reading per query, the explain charts
    on shared axes, the null-prompt ranking when scored, failures, the aggregate, and the provenance."""
    from carv_attrib.pipeline.report import run_report

    fmt = check_format(fmt)
    path = run_report(cfg)
    if fmt != "human":
        emit({"report": str(path)}, fmt)
    else:
        say(f"wrote {path}")
