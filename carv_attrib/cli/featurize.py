"""`carv-attrib featurize` and `carv-attrib index`: projected gradients, then the FAISS index."""

from __future__ import annotations

import dataclasses
import time

from rich.text import Text

from carv_attrib.cli.common import (
    check_format,
    emit,
    err_console,
    handle_errors,
    record_run,
    say,
)
from carv_attrib.cli.options import config_parameters, format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import FeaturizeConfig, IndexConfig

# featurize ends by building the index: it takes `index`'s options too (not its RUN argument). Not given,
# each keeps the run's current index's choice (or IndexConfig's default when there is no index yet).
_INDEX_OPTIONS = [p.replace(default=None) for p in config_parameters(IndexConfig) if p.name != "run"]


@handle_errors
@stage_command(FeaturizeConfig, extra=[*_INDEX_OPTIONS, format_param()])
def featurize(cfg: FeaturizeConfig, fmt: str, **index_options: object) -> None:
    """Per-clip projected gradients (K draws per cached encode) into RUN/features, then RUN/index."""
    from carv_attrib.pipeline.featurize import run_featurize
    from carv_attrib.pipeline.index import build_run_index, index_config_keeping, precheck_index

    fmt = check_format(fmt)
    started = time.monotonic()
    index_cfg, kept = index_config_keeping(cfg.run, index_options)  # bad options refused before the work
    with ClipProgress("featurize") as progress:
        check = None if cfg.shard is not None else (lambda dim, n: precheck_index(index_cfg, dim, n))
        summary = run_featurize(cfg, progress, index_check=check)
    changes = ", ".join(f"{k} {v}" for k, v in summary.changes.items() if k != "to_compute")
    if summary.dry_run:
        if fmt != "human":
            emit(summary.__dict__, fmt)
        else:
            err_console.print(
                Text.assemble(
                    ("dry run", "yellow"),
                    f": would compute {summary.changes['to_compute']} features ({changes}), about "
                    f"{summary.estimated_s:.0f} s, then rebuild the index; nothing was written",
                )
            )
        return
    if cfg.shard is not None:  # one part of several: the index waits for all of them
        if fmt != "human":
            emit(summary.__dict__, fmt)
        say(
            f"part {cfg.shard}: computed {summary.computed} features ({changes}); once every part is done, "
            f"`carv-attrib index {cfg.run}` builds the index (it refuses while clips lack features)"
        )
        record_run(cfg.run, "featurize", device=cfg.device, started=started, summary=summary.__dict__)
        return
    info = build_run_index(index_cfg)
    summary.index = {
        "count": info.count,
        "dim": info.dim,
        "preconditioner": info.preconditioner["kind"],
        "kept": kept,
    }
    record_run(cfg.run, "featurize", device=cfg.device, started=started, summary=summary.__dict__)
    if fmt != "human":
        emit(summary.__dict__, fmt)
        return
    err_console.print(
        Text.assemble(
            ("featurized", "green"),
            f" {summary.computed} clips ({changes}) in {summary.seconds:.1f} s; the run: "
            f"{summary.ok}/{summary.clips} clips ok (dim {summary.dim}, {summary.nonfinite} non-finite, "
            f"p(σ) {summary.density}); index: {info.count} clips, {info.preconditioner['kind']} -> {cfg.run}/index",
        )
    )
    if kept:
        kept_text = ", ".join(f"{k} {v}" for k, v in kept.items())
        say(f"the index kept the previous index's {kept_text} (give the option to change it)")


@handle_errors
@stage_command(IndexConfig, extra=[format_param()])
def index(cfg: IndexConfig, fmt: str) -> None:
    """Rebuild RUN/index with another preconditioner or FAISS factory, without recomputing gradients."""
    from carv_attrib.pipeline.index import build_run_index

    fmt = check_format(fmt)
    started = time.monotonic()
    info = build_run_index(cfg)
    record_run(cfg.run, "index", started=started, preconditioner=info.preconditioner)
    if fmt != "human":
        d = dataclasses.asdict(info)
        emit({k: d[k] for k in ("count", "dim", "factory", "preconditioner", "nprobe", "live_digest")}, fmt)
        return
    err_console.print(
        Text.assemble(
            ("indexed", "green"),
            f" {info.count} clips, dim {info.dim}, {info.preconditioner['kind']}, {info.factory}",
        )
    )
