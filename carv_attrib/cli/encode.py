"""`carv-attrib encode`: decode + VAE-encode + embed captions once per clip, into RUN/latents."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from carv_attrib.cli.common import (
    Device,
    DType,
    ModelOpt,
    Overwrite,
    err_console,
    handle_errors,
    out_console,
    record_run,
)
from carv_attrib.cli.progress import ClipProgress


@handle_errors
def encode(
    manifest: Annotated[Path, typer.Argument(help="Manifest: VidGen JSON, JSONL, CSV or Parquet.")],
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create or resume.")],
    videos: Annotated[
        Path | None,
        typer.Option("--videos", help="Videos root: paths are relative to it (VIDEOS/<id>.mp4 by default)."),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per clip, 1 + 4k.")] = 17,
    size: Annotated[str, typer.Option(help="WxH, multiples of 16.")] = "64x64",
    fps: Annotated[float, typer.Option(help="Sampling fps (0 = consecutive source frames).")] = 8.0,
    pad_short: Annotated[
        bool, typer.Option("--pad-short", help="Repeat the last frame of short clips.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per VAE call.")] = 4,
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = decode in this process).")] = 2,
    device: Device = "auto",
    dtype: DType = "float32",
    latent_dtype: Annotated[
        str, typer.Option("--latent-dtype", help="Storage dtype: float32 | float16.")
    ] = "float32",
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Clips per Parquet shard (resume unit).")
    ] = 64,
    max_failure_rate: Annotated[
        float, typer.Option("--max-failure-rate", help="Exit 3 when more than this share of clips failed.")
    ] = 0.05,
    decode_timeout: Annotated[
        float, typer.Option("--decode-timeout", help="Seconds per clip before it is killed.")
    ] = 120.0,
    id_column: Annotated[str, typer.Option("--id-column")] = "vid",
    caption_column: Annotated[str, typer.Option("--caption-column")] = "caption",
    path_column: Annotated[
        str | None, typer.Option("--path-column", help="Default: 'path' when present.")
    ] = None,
    manifest_format: Annotated[
        str | None,
        typer.Option("--manifest-format", help="vidgen | jsonl | csv | parquet (default: by extension)."),
    ] = None,
    allow_absolute_paths: Annotated[
        bool, typer.Option("--allow-absolute-paths", help="Accept paths outside the videos root.")
    ] = False,
    overwrite: Overwrite = False,
    fmt: Annotated[str, typer.Option("--format", help="human | json summary on stdout.")] = "human",
) -> None:
    """Decode and encode every clip of MANIFEST once; cache latents and text embeddings in RUN/latents."""
    from carv_attrib.data.manifest import ManifestOptions
    from carv_attrib.data.video import FramePolicy, parse_size
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode

    started = time.monotonic()
    w, h = parse_size(size)
    cfg = EncodeConfig(
        manifest=manifest,
        videos=videos,
        model=model,
        out=out,
        manifest_options=ManifestOptions(
            id_column=id_column,
            caption_column=caption_column,
            path_column=path_column,
            fmt=manifest_format,
            allow_absolute_paths=allow_absolute_paths,
        ),
        policy=FramePolicy(frames=frames, height=h, width=w, fps=fps, pad_short=pad_short),
        batch_size=batch_size,
        workers=workers,
        device=device,
        dtype=dtype,
        latent_dtype=latent_dtype,
        shard_size=shard_size,
        max_failure_rate=max_failure_rate,
        decode_timeout=decode_timeout,
        overwrite=overwrite,
    )
    with ClipProgress("encode") as progress:
        summary = run_encode(cfg, progress)
    record_run(out, "encode", device=device, started=started, summary=summary.__dict__)
    if fmt == "json":
        out_console.print_json(json.dumps(summary.__dict__, default=str))
    else:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items())) or "none"
        err_console.print(
            f"[green]encoded[/] {summary.ok}/{summary.total} clips ok, failures: {kinds} "
            f"({summary.shards_written} shards written, {summary.shards_skipped} resumed) "
            f"in {summary.seconds:.1f} s, {summary.clips_per_s:.2f} clips/s -> {out}/latents"
        )
        for ex in summary.examples:
            err_console.print(f"  [red]{ex['status']}[/] {ex['vid']}: {ex['error']}", soft_wrap=True)
    if summary.failure_rate > max_failure_rate:
        err_console.print(
            f"[bold red]too many failures:[/] {summary.failed}/{summary.total} clips "
            f"({summary.failure_rate:.1%} > --max-failure-rate {max_failure_rate:.1%})"
        )
        raise typer.Exit(3)
