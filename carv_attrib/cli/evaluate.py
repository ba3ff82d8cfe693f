"""`carv-attrib evaluate`: LDS of featurize settings on a run, against retrained subset models."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from carv_attrib.cli.common import check_format, emit, err_console, handle_errors, out_console, say
from carv_attrib.cli.options import format_param, stage_command
from carv_attrib.config import EvaluateConfig


@handle_errors
@stage_command(EvaluateConfig, extra=[format_param()])
def evaluate(cfg: EvaluateConfig, fmt: str | None) -> None:
    """How faithful are the attributions on RUN? Hold out queries, retrain MODEL on random halves of
    the other clips, and score each --variant setting by LDS with a 95 % CI over subsets, queries and
    seeds (JSON to --out)."""
    from carv_attrib.pipeline.evaluate import run_evaluate

    fmt = check_format(fmt)
    doc = run_evaluate(cfg, say=lambda s: err_console.print(Text.assemble(("evaluate", "bold cyan"), " ", s)))
    if fmt != "human":
        emit(doc, fmt)
        return
    p, floor = doc["protocol"], doc["random_floor"]
    table = Table(
        title=f"LDS on {p['train_clips']} clips, {p['queries']} queries, {p['subsets']} subsets "
        f"(random scores {floor['mean']:.3f} ± {floor['sd']:.3f})",
        title_justify="left",
    )
    for col in ("setting", "LDS", "95 % CI", "query-specific", "common factor", "draws/clip", "seconds"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, row in doc["settings"].items():
        lo, hi = row["lds"].get("ci95_subsets", row["lds"]["ci95"])
        qs = row.get("query_specific_lds", {}).get("mean")
        cf = row.get("common_factor_lds")
        table.add_row(
            Text(name),
            f"{row['lds']['mean']:.3f}",
            f"[{lo:.3f}, {hi:.3f}]",
            "" if qs is None else f"{qs:.3f}",
            "" if cf is None else f"{cf:.3f}",
            str(row["draws"]),
            f"{row['seconds']:.0f}",
        )
    out_console.print(table)
    say(f"wrote {cfg.out}" + (f" and {cfg.plot}" if cfg.plot else ""), style="green")
