"""`carv-attrib status RUN` and `carv-attrib env`."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from carv_attrib.cli.common import check_format, emit, handle_errors, out_console
from carv_attrib.cli.options import FORMAT_HELP
from carv_attrib.pipeline._job import package_versions

Format = Annotated[str | None, typer.Option("--format", help=FORMAT_HELP, show_default=False)]


@handle_errors
def status(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    fmt: Format = None,
) -> None:
    """Show what RUN holds: stages, finished shards, clip statuses, fingerprints, index."""
    from carv_attrib.pipeline.status import status_doc

    fmt = check_format(fmt)
    doc = status_doc(run)
    if fmt != "human":
        emit(doc.to_dict(), fmt)
        return
    table = Table(title=Text(f"run {run}"), show_lines=False)
    table.add_column("stage")
    table.add_column("fingerprint")
    table.add_column("shards")
    table.add_column("current clips")
    table.add_column("statuses")
    for stage, s in (("latents", doc.latents), ("features", doc.features)):
        if s is None:
            table.add_row(stage, "-", "-", "-", "not started")
            continue
        live = s.live
        if stage == "latents":
            statuses = live.statuses if live is not None and live.statuses is not None else s.statuses
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
            if s.decoders:
                kinds += " (decoded by " + ", ".join(f"{k} {v}" for k, v in sorted(s.decoders.items())) + ")"
            if live is not None and live.pending:
                kinds += f"; {live.pending} not encoded yet"
        else:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.statuses.items()))
            if live is not None and live.to_compute:
                kinds = f"{live.to_compute} clips to featurize; " + kinds
        if live is not None and live.superseded_rows:
            kinds += f"; {live.superseded_rows} superseded rows"
        clips = live.clips if live is not None else s.rows
        table.add_row(stage, s.fingerprint, str(s.shards_done), str(clips), Text(kinds))
    idx = doc.index
    if idx:
        fresh = "fresh" if idx.fresh else "STALE: rerun featurize"
        sm = idx.summary  # every field may be missing from an old index: shown as - or ?
        table.add_row(
            "index",
            sm.fingerprint or "-",
            "-",
            str(sm.count if sm.count is not None else "-"),
            f"{sm.preconditioner_kind or '?'}, dim {sm.dim if sm.dim is not None else '?'}"
            + (
                f" -> {sk['out_dim']} indexed ({sk.get('kind', '?')})"
                if (sk := sm.document.get("sketch"))
                else ""
            )
            + (f", {sh} shards" if (sh := sm.document.get("shards") or 1) > 1 else "")
            + f", {fresh}"
            + (
                f"; LoRA rank {sm.lora.get('rank', '?')} {str(sm.lora.get('weights_sha256', ''))[:12]}"
                if sm.lora
                else ""
            ),
        )
    else:
        table.add_row("index", "-", "-", "-", "not built")
    out_console.print(table)
    if doc.layout_error:
        out_console.print(Text(doc.layout_error), soft_wrap=True)
    if doc.manifest_clips is not None:
        out_console.print(f"manifest: {doc.manifest_clips} clips")
    if doc.index_note:
        out_console.print(Text(doc.index_note), soft_wrap=True)
    if doc.writer:
        out_console.print(Text(f"being written by {doc.writer}"), soft_wrap=True)


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
