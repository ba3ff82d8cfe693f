"""`carv-attrib score`: rank the training clips behind generated videos; JSON/JSONL or a table."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from carv_attrib.cli.common import Device, err_console, handle_errors, out_console, record_run
from carv_attrib.errors import UsageError


def parse_top_k(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--top-k {text!r}: a positive integer or 'all'") from None
    if k < 1:
        raise UsageError("--top-k must be >= 1 or 'all'")
    return k


def render_table(doc: dict[str, Any]) -> None:
    for q in doc["queries"]:
        if q["status"] != "ok":
            out_console.print(f"[red]{q['path']}: {q['error']}[/]")
            continue
        table = Table(title=f"{q['path']} — “{q['prompt']}”", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("vid")
        table.add_column("score", justify="right")
        table.add_column("caption")
        for r in q["results"]:
            table.add_row(str(r["rank"]), str(r["vid"]), f"{r['score']:.6g}", str(r["caption"]))
        out_console.print(table)
    agg = doc.get("aggregate")
    if agg:
        table = Table(title=f"aggregate ({agg['method']}, {agg['queries']} queries)", title_justify="left")
        for col in ("rank", "vid", "score", "caption"):
            table.add_column(col)
        for r in agg["results"]:
            table.add_row(str(r["rank"]), str(r["vid"]), f"{r['score']:.6g}", str(r["caption"]))
        out_console.print(table)


@handle_errors
def score(
    queries: Annotated[list[Path], typer.Argument(help="Generated video(s) to attribute.")],
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory with an index.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The prompt of the (single) query.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="JSON {path: prompt} or CSV path,prompt.")
    ] = None,
    top_k: Annotated[str, typer.Option("--top-k", "-k", help="N or 'all' (every training clip).")] = "10",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the JSON document here.")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="human | json | jsonl (default: human on a TTY, else json)."),
    ] = None,
    aggregate: Annotated[
        str, typer.Option("--aggregate", help="none | mean | vote (majority over per-query top-k).")
    ] = "none",
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Defaults to the model recorded in RUN; checked either way."),
    ] = None,
    device: Device = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes (0: in this process).")] = 1,
) -> None:
    """Score QUERY videos against RUN's index: the training clips that shaped each, best first."""
    from carv_attrib.data.store import write_json_atomic
    from carv_attrib.pipeline.score import ScoreConfig, run_score

    started = time.monotonic()
    fmt = fmt or ("human" if sys.stdout.isatty() else "json")
    if fmt not in ("human", "json", "jsonl"):
        raise UsageError(f"--format {fmt}: choose human, json or jsonl")
    cfg = ScoreConfig(
        run=run,
        queries=list(queries),
        prompt=prompt,
        prompts_file=prompts,
        top_k=parse_top_k(top_k),
        aggregate=aggregate,
        model=model,
        device=device,
        workers=workers,
    )
    doc = run_score(cfg)
    if json_out is not None:
        write_json_atomic(json_out, doc, sort_keys=False)
    record_run(
        run,
        "score",
        device=device,
        started=started,
        queries=len(queries),
        json=str(json_out) if json_out else None,
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "jsonl":
        for q in doc["queries"]:
            sys.stdout.write(json.dumps({"index": doc["index"]["fingerprint"], **q}) + "\n")
    else:
        render_table(doc)
    failed = [q for q in doc["queries"] if q["status"] != "ok"]
    if failed:
        err_console.print(f"[yellow]{len(failed)} of {len(doc['queries'])} queries could not be scored[/]")
        if len(failed) == len(doc["queries"]):
            raise typer.Exit(1)
