"""`carv-attrib curate ATTRIBUTION.json... --manifest M -o SUBSET (--top P | --bottom P | --threshold X)`;
M is a manifest, WebDataset shards, a saved Hugging Face dataset or a sidecar folder, and SUBSET the same kind."""

from __future__ import annotations

import dataclasses

from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import CurateConfig


@handle_errors
@stage_command(CurateConfig, extra=[format_param()])
def curate(cfg: CurateConfig, fmt: str | None) -> None:
    """Aggregate many queries' attributions per training clip (mean, rank-sum or vote) and write the
    top / bottom / thresholded subset of the training data in its own form (a manifest, WebDataset
    shards, a saved Hugging Face dataset, a sidecar folder), plus the aggregate as CSV."""
    from carv_attrib.pipeline.curate import run_curate

    fmt = check_format(fmt)
    summary = run_curate(cfg)
    if fmt != "human":
        emit(dataclasses.asdict(summary), fmt, summary.per_query)
        return
    if summary.kind == "manifest":
        wrote = f"{summary.written} manifest rows"
    else:
        shards = f" in {summary.shards} shards" if summary.shards is not None else ""
        wrote = f"{summary.written} clips ({summary.kind}{shards}, {summary.files} files)"
    if summary.exclude:
        wrote += " (all but the selected)"
    say(
        f"curated {summary.queries} queries over {summary.clips} clips by {summary.method}: "
        f"{summary.selected} selected, {wrote} -> {summary.out}"
        + (f"; aggregate -> {summary.csv}" if summary.csv else "")
    )
    if summary.not_in_input:
        say(
            f"warning: {summary.not_in_input} of the {summary.selected} selected clips are not in "
            f"{cfg.manifest}: the subset lacks them"
        )
    for q in summary.per_query:
        say(f"  {q['path']}: {q['selected_in_top_k']} of its top {q['k']} selected")
