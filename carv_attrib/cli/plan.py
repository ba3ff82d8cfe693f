"""`carv-attrib plan`: measure costs and variances on a pilot; fit the proposal q(σ)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from carv_attrib.cli.common import (
    Device,
    DType,
    Format,
    Seed,
    err_console,
    handle_errors,
    out_console,
    record_run,
)


@handle_errors
def plan(
    run: Annotated[Path, typer.Argument(help="Run directory with a latent cache.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model that encoded RUN.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="plan.json to write (for featurize --plan).")
    ] = Path("plan.json"),
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG: q(σ) beside p(σ), variance×cost against K.")
    ] = None,
    pilot_clips: Annotated[int, typer.Option("--pilot-clips", help="Cached clips in the pilot.")] = 8,
    bins: Annotated[int, typer.Option("--bins", help="σ bins of the proposal.")] = 10,
    draws: Annotated[
        int, typer.Option("--draws", "-K", help="K at which scheme variances are measured.")
    ] = 8,
    replicates: Annotated[int, typer.Option("--replicates", help="Independent seeds per scheme.")] = 6,
    mix: Annotated[float, typer.Option("--mix", help="α in q = (1-α) q* + α p (weights ≤ 1/α).")] = 0.1,
    density: Annotated[
        str, typer.Option("--density", help="p(σ): uniform | logit-normal:m,s | shift:k.")
    ] = "uniform",
    output_fn: Annotated[
        str, typer.Option("--output-fn", help="loss | sqnorm: the output whose gradient featurize will use.")
    ] = "loss",
    k_max: Annotated[int, typer.Option("--k-max", help="Largest K to consider.")] = 64,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DType = "float32",
    fmt: Format = "human",
) -> None:
    """Pilot CARV's accounting on RUN: c_enc, c_draw, per-σ gradient moments, the fitted proposal q,
    within-encode variance per scheme, ECM against fresh-encode iid K=1, and a recommended K."""
    from carv_attrib.pipeline.plan import PlanConfig, run_plan

    started = time.monotonic()
    cfg = PlanConfig(
        run=run,
        model=model,
        out=out,
        plot=plot,
        pilot_clips=pilot_clips,
        bins=bins,
        draws=draws,
        replicates=replicates,
        mix=mix,
        density=density,
        output_fn=output_fn,
        k_max=k_max,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    result = run_plan(cfg)
    record_run(run, "plan", device=device, started=started, out=str(out), recommended=result["recommended"])
    if fmt == "json":
        out_console.print_json(json.dumps(result))
        return
    c = result["costs"]
    out_console.print(
        f"c_enc {c['c_enc']:.4g} s/clip ({c['c_enc_source']}), c_draw {c['c_draw']:.4g} s/draw, "
        f"ratio {c['c_enc_over_c_draw']:.3g}; σ_b² = 0 (mode latents)"
    )
    ks = list(next(iter(result["schemes"].values()))["ecm"])
    table = Table(title=f"ECM against fresh-encode iid K=1 (within-encode variance measured at K={draws})")
    table.add_column("scheme")
    table.add_column("var/draw vs iid", justify="right")
    for k in ks:
        table.add_column(f"K={k}", justify="right")
    table.add_column("limit", justify="right")
    for name, row in result["schemes"].items():
        table.add_row(
            name,
            f"{row['variance_ratio_vs_iid']:.3f}",
            *[f"{row['ecm'][k]:.2f}" for k in ks],
            f"{row['ecm_limit']:.1f}",
        )
    out_console.print(table)
    r = result["recommended"]
    flags = [f"--timesteps {r['scheme']}", f"--draws {r['draws']}"]
    flags += ["--antithetic"] if r["antithetic"] else []
    flags += [f"--output-fn {result['output_fn']}"] if result["output_fn"] != "loss" else []
    if r["scheme"] == "stratified-is":
        flags.append(f"--plan {out}")  # carries its density
    elif result["density"] != "uniform":
        flags.append(f"--density {result['density']}")
    err_console.print(f"[green]recommended[/] {' '.join(flags)} (ECM {r['ecm']:.2f})")
