"""`carv-attrib score`: rank the training clips behind generated videos; JSON/JSONL or a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from carv_attrib.cli.common import check_format, emit, handle_errors, out_console, record_run, say
from carv_attrib.cli.options import format_param, param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import ScoreConfig, parse_top_k
from carv_attrib.errors import EXIT_PARTIAL


def render_table(doc: dict[str, Any]) -> None:
    """Human tables on stdout; captions, paths and errors are shown literally (rich `Text`, no markup)."""
    for q in doc["queries"]:
        if q["status"] != "ok":
            out_console.print(Text(f"{q['path']}: {q['error']}", style="red"))
            continue
        table = Table(title=Text(f"{q['path']} — “{q['prompt']}”"), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("vid")
        table.add_column("score", justify="right")
        table.add_column("caption")
        for r in q["results"]:
            table.add_row(str(r["rank"]), Text(str(r["vid"])), f"{r['score']:.6g}", Text(str(r["caption"])))
        out_console.print(table)
    agg = doc.get("aggregate")
    if agg:
        table = Table(title=f"aggregate ({agg['method']}, {agg['queries']} queries)", title_justify="left")
        for col in ("rank", "vid", "score", "caption"):
            table.add_column(col)
        for r in agg["results"]:
            table.add_row(str(r["rank"]), Text(str(r["vid"])), f"{r['score']:.6g}", Text(str(r["caption"])))
        out_console.print(table)


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
    from carv_attrib.data.store import write_json_atomic
    from carv_attrib.pipeline.score import run_score

    started = time.monotonic()
    fmt = check_format(fmt)
    cfg.top_k = parse_top_k(top_k)
    with ClipProgress("score", unit="steps") as progress:
        doc = run_score(cfg, progress)
    if out is not None:
        write_json_atomic(out, doc, sort_keys=False)
    record_run(
        cfg.run,
        "score",
        device=cfg.device,
        started=started,
        queries=len(cfg.queries),
        json=str(out) if out else None,
    )
    if fmt != "human":
        # jsonl: one line per query, then one per aggregate (--aggregate), each naming its index
        fp = {"index": doc["index"]["fingerprint"]}
        lines = [fp | q for q in doc["queries"]]
        lines += [fp | {"aggregate": doc["aggregate"]}] if doc.get("aggregate") else []
        emit(doc, fmt, lines)
    else:
        render_table(doc)
    for warning in doc.get("warnings", []):  # user text (paths) printed literally
        say(f"warning: {warning}", style="yellow")
    failed = [q for q in doc["queries"] if q["status"] != "ok"]
    if failed:  # exit 3 whether 1 of 1 or 1 of 3 failed: the document says which
        say(f"{len(failed)} of {len(doc['queries'])} queries could not be scored", style="yellow", error=True)
        raise typer.Exit(EXIT_PARTIAL)
