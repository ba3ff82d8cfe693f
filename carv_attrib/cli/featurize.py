"""`carv-attrib featurize` and `carv-attrib index`: projected gradients, then the FAISS index."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from carv_attrib.cli.common import (
    Device,
    DType,
    Format,
    Overwrite,
    Seed,
    err_console,
    handle_errors,
    out_console,
    record_run,
)
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.errors import UsageError

Precondition = Annotated[
    str, typer.Option("--precondition", help="identity (TracIn) | trak ((ΦᵀΦ+λI)⁻¹) | cosine.")
]
Lambda = Annotated[float, typer.Option("--lambda", help="TRAK damping relative to tr(ΦᵀΦ)/d.")]
Factory = Annotated[
    str | None,
    typer.Option(
        "--index-factory", help="FAISS factory string for large runs, e.g. IVF1024,PQ32 (default Flat)."
    ),
]


def parse_kron_dims(text: str | None) -> tuple[int, int] | None:
    """'16x8' -> (16, 8) = (k_out, k_in)."""
    if text is None:
        return None
    try:
        k_out, k_in = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--kron-dims {text}: expected OUTxIN, e.g. 16x8") from None
    if k_out < 1 or k_in < 1:
        raise UsageError(f"--kron-dims {text}: both sizes must be >= 1")
    return k_out, k_in


@handle_errors
def featurize(
    run: Annotated[Path, typer.Argument(help="Run directory with a latent cache (from encode).")],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Wan2.1 diffusers directory or Hub id (the one that encoded RUN)."
        ),
    ],
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint", help="Transformer checkpoint (dir or .safetensors); repeat for an ensemble."
        ),
    ] = None,
    draws: Annotated[int, typer.Option("--draws", "-K", help="(σ, ε) draws per cached encode.")] = 8,
    timesteps: Annotated[
        str, typer.Option("--timesteps", help="iid | stratified | stratified-is.")
    ] = "stratified-is",
    density: Annotated[
        str, typer.Option("--density", help="p(σ): uniform | logit-normal:m,s | shift:k.")
    ] = "uniform",
    plan: Annotated[
        Path | None, typer.Option("--plan", help="plan.json from `carv-attrib plan` (fitted proposal q).")
    ] = None,
    output_fn: Annotated[str, typer.Option("--output-fn", help="loss | sqnorm (D-TRAK).")] = "loss",
    projector: Annotated[
        str, typer.Option("--projector", help="kron (per-layer, default) | dense (reference).")
    ] = "kron",
    proj_dim: Annotated[
        int | None,
        typer.Option("--proj-dim", help="Feature dim per checkpoint (default kron: 8x8 per layer)."),
    ] = None,
    kron_dims: Annotated[
        str | None,
        typer.Option(
            "--kron-dims",
            metavar="OUTxIN",
            help="kron: k_out x k_in per Linear layer (default 8x8; D = layers x k_out x k_in).",
        ),
    ] = None,
    matrix: Annotated[
        str, typer.Option("--matrix", help="Random projection entries: gaussian | rademacher.")
    ] = "gaussian",
    layers: Annotated[
        list[str] | None,
        typer.Option("--layers", help="Glob on Linear module names (repeatable); default blocks.*"),
    ] = None,
    precondition: Precondition = "cosine",
    lambda_rel: Lambda = 1e-2,
    index_factory: Factory = None,
    seed: Seed = 0,
    noise: Annotated[
        str, typer.Option("--noise", help="shared (common random numbers) | per-clip.")
    ] = "shared",
    antithetic: Annotated[bool, typer.Option("--antithetic", help="Pair draws as (ε, -ε).")] = False,
    batch_clips: Annotated[int, typer.Option("--batch-clips", "-B", help="Clips per backward.")] = 4,
    device: Device = "auto",
    dtype: DType = "float32",
    overwrite: Overwrite = False,
    fmt: Format = "human",
) -> None:
    """Per-clip projected gradients (K draws per cached encode) into RUN/features, then RUN/index."""
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.pipeline.index import build_run_index

    started = time.monotonic()
    cfg = FeaturizeConfig(
        run=run,
        model=model,
        checkpoints=list(checkpoint or []),
        draws=draws,
        timesteps=timesteps,
        density=density,
        plan=plan,
        output_fn=output_fn,
        projector=projector,
        proj_dim=proj_dim,
        kron_dims=parse_kron_dims(kron_dims),
        matrix=matrix,
        layers=tuple(layers or ("blocks.*",)),
        precondition=precondition,
        lambda_rel=lambda_rel,
        index_factory=index_factory,
        seed=seed,
        noise=noise,
        antithetic=antithetic,
        batch_clips=batch_clips,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
    )
    with ClipProgress("featurize") as progress:
        summary = run_featurize(cfg, progress)
    info = build_run_index(run, precondition=precondition, lambda_rel=lambda_rel, factory=index_factory)
    summary.index = {
        "count": info["count"],
        "dim": info["dim"],
        "preconditioner": info["preconditioner"]["kind"],
    }
    record_run(run, "featurize", device=device, started=started, summary=summary.__dict__)
    if fmt == "json":
        out_console.print_json(json.dumps(summary.__dict__, default=str))
        return
    err_console.print(
        f"[green]featurized[/] {summary.ok}/{summary.clips} clips (dim {summary.dim}, {summary.nonfinite} non-finite, "
        f"{summary.shards_written} shards written, {summary.shards_skipped} resumed) in {summary.seconds:.1f} s; "
        f"index: {info['count']} clips, {info['preconditioner']['kind']} -> {run}/index"
    )


@handle_errors
def index(
    run: Annotated[Path, typer.Argument(help="Run directory with features.")],
    precondition: Precondition = "cosine",
    lambda_rel: Lambda = 1e-2,
    index_factory: Factory = None,
    fmt: Format = "human",
) -> None:
    """Rebuild RUN/index with another preconditioner or FAISS factory, without recomputing gradients."""
    from carv_attrib.pipeline.index import build_run_index

    started = time.monotonic()
    info = build_run_index(run, precondition=precondition, lambda_rel=lambda_rel, factory=index_factory)
    record_run(run, "index", started=started, preconditioner=info["preconditioner"])
    if fmt == "json":
        out_console.print_json(
            json.dumps({k: info[k] for k in ("count", "dim", "factory", "preconditioner")})
        )
        return
    err_console.print(
        f"[green]indexed[/] {info['count']} clips, dim {info['dim']}, {info['preconditioner']['kind']}, {info['factory']}"
    )
