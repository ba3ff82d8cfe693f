"""`carv-attrib status RUN` and `carv-attrib env`."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from carv_attrib.cli.common import check_format, emit, handle_errors, out_console, package_versions
from carv_attrib.cli.options import FORMAT_HELP

Format = Annotated[str | None, typer.Option("--format", help=FORMAT_HELP, show_default=False)]


@handle_errors
def status(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    fmt: Format = None,
) -> None:
    """Show what RUN holds: stages, finished shards, clip statuses, fingerprints, index."""
    from carv_attrib.pipeline.status import run_status

    fmt = check_format(fmt)
    info = run_status(run)
    if fmt != "human":
        emit(info, fmt)
        return
    table = Table(title=Text(f"run {run}"), show_lines=False)
    table.add_column("stage")
    table.add_column("fingerprint")
    table.add_column("shards")
    table.add_column("current clips")
    table.add_column("statuses")
    for stage in ("latents", "features"):
        s = info.get(stage)
        if s is None:
            table.add_row(stage, "-", "-", "-", "not started")
            continue
        live = s.get("live") or {}
        if stage == "latents":
            statuses = live.get("statuses", s["statuses"])
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
            if s.get("decoders"):
                kinds += (
                    " (decoded by " + ", ".join(f"{k} {v}" for k, v in sorted(s["decoders"].items())) + ")"
                )
            if live.get("pending"):
                kinds += f"; {live['pending']} not encoded yet"
        else:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()))
            if live.get("to_compute"):
                kinds = f"{live['to_compute']} clips to featurize; " + kinds
        if live.get("superseded_rows"):
            kinds += f"; {live['superseded_rows']} superseded rows"
        table.add_row(
            stage, s["fingerprint"], str(s["shards_done"]), str(live.get("clips", s["rows"])), Text(kinds)
        )
    idx: dict[str, Any] | None = info.get("index")
    if idx:
        fresh = "fresh" if idx.get("fresh") else "STALE: rerun featurize"
        table.add_row(
            "index",
            str(idx.get("fingerprint", "-")),
            "-",
            str(idx.get("count", "-")),
            f"{idx.get('preconditioner', {}).get('kind', '?')}, dim {idx.get('dim', '?')}, {fresh}",
        )
    else:
        table.add_row("index", "-", "-", "-", "not built")
    out_console.print(table)
    if info.get("layout_error"):
        out_console.print(Text(info["layout_error"]), soft_wrap=True)
    if "manifest_clips" in info:
        out_console.print(f"manifest: {info['manifest_clips']} clips")


@handle_errors
def env(fmt: Format = None) -> None:
    """Versions, devices and threads: what to paste into a bug report."""
    import torch

    fmt = check_format(fmt)
    info: dict[str, Any] = {
        "carv_attrib": __import__("carv_attrib").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(
            (
                "torch",
                "diffusers",
                "transformers",
                "accelerate",
                "decord",
                "av",
                "pyarrow",
                "faiss-cpu",
                "faiss-gpu",
                "typer",
                "rich",
                "ray",
            )
        ),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        info["faiss_gpus"] = None
    if fmt != "human":
        emit(info, fmt)
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        out_console.print(Text.assemble((f"{key}", "bold"), f": {value}"))
