"""`carv-attrib encode`: decode + VAE-encode + embed captions once per clip, into RUN/latents."""

from __future__ import annotations

import time

import typer
from rich.text import Text

from carv_attrib.cli.common import (
    check_format,
    emit,
    err_console,
    handle_errors,
    record_run,
    say,
)
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import EncodeConfig
from carv_attrib.errors import EXIT_PARTIAL


@handle_errors
@stage_command(EncodeConfig, extra=[format_param()])
def encode(cfg: EncodeConfig, fmt: str) -> None:
    """Decode and encode every clip of MANIFEST once; cache latents and text embeddings in RUN/latents."""
    from carv_attrib.pipeline.encode import run_encode

    fmt = check_format(fmt)
    started = time.monotonic()
    with ClipProgress("encode") as progress:
        summary = run_encode(cfg, progress)
    if not summary.dry_run:
        record_run(cfg.run, "encode", device=cfg.device, started=started, summary=summary.__dict__)
    if fmt != "human":
        emit(summary.__dict__, fmt)
    else:
        changes = ", ".join(f"{k} {v}" for k, v in summary.changes.items() if k != "to_encode")
        if summary.dry_run:
            err_console.print(
                Text.assemble(
                    ("dry run", "yellow"),
                    f": would encode {summary.changes['to_encode']} clips ({changes}), about "
                    f"{summary.estimated_s:.0f} s; nothing was written",
                )
            )
            return
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items())) or "none"
        err_console.print(
            Text.assemble(
                ("encoded", "green"),
                f" {summary.encoded} clips ({changes}) in {summary.seconds:.1f} s, "
                f"{summary.clips_per_s:.2f} clips/s; the run: {summary.ok}/{summary.total} clips ok, "
                f"failures: {kinds} -> {cfg.run}/latents",
            )
        )
        for ex in summary.examples:  # user and library text: printed literally, never as markup
            err_console.print(
                Text.assemble("  ", (str(ex["status"]), "red"), f" {ex['vid']}: {ex['error']}"),
                soft_wrap=True,
            )
        if cfg.shard is not None:
            say(
                f"part {cfg.shard} done; once every part is, the same command without --shard commits "
                "the run (it finds the parts' clips and encodes only what a part missed)"
            )
        if set(summary.failures) - {"missing"} and summary.changes["retried"] == 0:
            # a missing file is encoded once it is back; other failures only when asked
            say("failed clips are kept as failures; `--retry-failed` tries them again")
    if cfg.shard is None and summary.failure_rate > cfg.max_failure_rate:  # parts: the commit pass checks
        say(
            f"too many failures: {summary.failed}/{summary.total} clips "
            f"({summary.failure_rate:.1%} > --max-failure-rate {cfg.max_failure_rate:.1%})",
            style="bold red",
            error=True,
        )
        raise typer.Exit(EXIT_PARTIAL)
