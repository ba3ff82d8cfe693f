"""`carv-attrib cost RUN --clips N`: device-hours, storage and index memory for the whole job."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from carv_attrib.cli.common import check_format, emit, handle_errors, out_console, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import CostConfig
from carv_attrib.space import human_bytes


def _hours(h: float | None) -> str:
    if h is None:
        return "unknown"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def _render(doc: dict[str, Any]) -> None:
    c, s, t, dev = doc["compute"], doc["storage"], doc["timings"], doc["measured_on"]
    sketched = doc.get("index_dim") and doc["index_dim"] != doc["dim"]  # --index-dim: the index holds D'
    dims = f"D={doc['dim']}" + (f", indexed at D'={doc['index_dim']}" if sketched else "")
    table = Table(title=f"{doc['clips']:,} clips, K={doc['draws']}, {dims}, {doc['devices']} device(s)")
    table.add_column("what")
    table.add_column("size", justify="right")
    table.add_column("from")
    c_enc = f"{t['c_enc_s']:.3g} s/clip" if t["c_enc_s"] is not None else "-"
    c_draw = f"{t['c_draw_s']:.3g} s/draw" if t["c_draw_s"] is not None else "-"
    table.add_row(
        "encode", _hours(c["encode_device_hours"]), f"{c_enc} on {dev['encode']}: {t['c_enc_source']}"
    )
    table.add_row(
        "featurize",
        _hours(c["featurize_device_hours"]),
        f"{c_draw} on {dev['featurize']}: {t['c_draw_source']}",
    )
    table.add_row("total (device-hours)", _hours(c["total_device_hours"]), "")
    table.add_row("wall clock", _hours(c["wall_hours"]), f"over {doc['devices']} device(s)")
    for what, key in (("latents on disk", "latents_bytes"), ("features on disk", "features_bytes")):
        table.add_row(
            what, human_bytes(s[key]) if s[key] is not None else "unknown", "run's shard bytes per clip × N"
        )
    for factory, b in doc["index_options"].items():
        mark = " (chosen)" if factory == doc["factory"] else ""
        table.add_row(
            f"index {factory}{mark}", human_bytes(b), "search.index.index_bytes: memory, approximate"
        )
    out_console.print(table)
    for m in doc["missing"]:
        say(f"not sized: {m}", style="yellow")


@handle_errors
@stage_command(CostConfig, extra=[format_param()])
def cost(cfg: CostConfig, fmt: str | None) -> None:
    """Size the whole job before starting it: device-hours of encode and featurize, latent and feature
    storage, and index memory for --clips N clips, each a per-clip figure RUN measured (or a plan.json /
    timings JSON) times N."""
    from carv_attrib.pipeline.cost import run_cost

    fmt = check_format(fmt)
    doc = run_cost(cfg)
    emit(doc, fmt) if fmt != "human" else _render(doc)
