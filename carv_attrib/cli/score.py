"""`carv-attrib score`: rank the training clips behind generated videos; JSON/JSONL or a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import format_param, param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import ScoreConfig, parse_top_k
from carv_attrib.errors import EXIT_PARTIAL

TOP_K = param(
    "top_k", Annotated[str, typer.Option("--top-k", "-k", help="N or 'all' (every training clip).")], "10"
)
OUT = param(
    "out",
    Annotated[
        Path | None, typer.Option("--out", "-o", "--json", help="Also write the JSON document to this file.")
    ],
    None,
)


@handle_errors
@stage_command(ScoreConfig, extra=[TOP_K, OUT, format_param()])
def score(cfg: ScoreConfig, top_k: str, out: Path | None, fmt: str | None) -> None:
    """Score QUERY videos against RUN's index: the training clips that shaped each, best first."""
    fmt = check_format(fmt)
    cfg.top_k = parse_top_k(top_k)
    cfg.check_early()  # again with --top-k, before torch loads
    from carv_attrib.pipeline.score import run_score

    with ClipProgress("score", unit="steps") as progress:
        doc = run_score(cfg, progress, out=out)
    if fmt != "human":
        # jsonl: one line per query, then one per aggregate (--aggregate), each naming its index
        fp = {"index": doc["index"]["fingerprint"]}
        lines = [fp | q for q in doc["queries"]]
        lines += [fp | {"aggregate": doc["aggregate"]}] if doc.get("aggregate") else []
        emit(doc, fmt, lines)
    else:
        render.score_tables(doc)
    for warning in doc.get("warnings", []):  # user text (paths) printed literally
        say(f"warning: {warning}", style="yellow")
    failed = [q for q in doc["queries"] if q["status"] != "ok"]
    if failed:  # exit 3 whether 1 of 1 or 1 of 3 failed: the document says which
        say(f"{len(failed)} of {len(doc['queries'])} queries could not be scored", style="yellow", error=True)
        raise typer.Exit(EXIT_PARTIAL)
