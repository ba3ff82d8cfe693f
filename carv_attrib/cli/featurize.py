"""`carv-attrib featurize` and `carv-attrib index`: projected gradients, then the FAISS index."""

from __future__ import annotations

import dataclasses

from carv_attrib.cli import render
from carv_attrib.cli.common import check_format, emit, handle_errors, say
from carv_attrib.cli.options import config_parameters, format_param, stage_command
from carv_attrib.cli.progress import ClipProgress
from carv_attrib.config import FeaturizeConfig, IndexConfig

# featurize ends by building the index: it takes `index`'s options too (not its RUN argument, nor its
# --wait: featurize's own covers the whole command). Not given, each keeps the run's current index's
# choice (or IndexConfig's default when there is no index yet).
# Nor index's --executor / --ray-address / --parts: featurize's own are its gradients' (its index is
# built by the driver, locally).
_INDEX_OPTIONS = [
    p.replace(default=None)
    for p in config_parameters(IndexConfig)
    if p.name not in ("run", "wait", "executor", "ray_address", "parts")
]
_INDEX_KEYS = (
    "count",
    "dim",
    "sketch",
    "factory",
    "preconditioner",
    "nprobe",
    "live_digest",
    "shards",
    "build",
)


@handle_errors
@stage_command(FeaturizeConfig, extra=[*_INDEX_OPTIONS, format_param()])
def featurize(cfg: FeaturizeConfig, fmt: str, **index_options: object) -> None:
    """Per-clip projected gradients (K draws per cached encode) into RUN/features, then RUN/index."""
    from carv_attrib.pipeline.featurize import featurize_and_index

    fmt = check_format(fmt)
    with ClipProgress("featurize") as progress:
        result = featurize_and_index(cfg, index_options, progress)
    emit(result.summary.to_dict(), fmt) if fmt != "human" else render.featurize(result, cfg)
    if cfg.shard is not None and not result.summary.dry_run:
        render.featurize_part(result.summary, cfg)


@handle_errors
@stage_command(IndexConfig, extra=[format_param()])
def index(cfg: IndexConfig, fmt: str) -> None:
    """Rebuild RUN/index with another preconditioner or FAISS factory, without recomputing gradients."""
    from carv_attrib.pipeline.index import run_index

    fmt = check_format(fmt)
    info = run_index(cfg)
    d = dataclasses.asdict(info)
    emit({k: d[k] for k in _INDEX_KEYS}, fmt) if fmt != "human" else render.index(info)
    built = int((info.build or {}).get("parts", 1))
    if cfg.parts is not None and built < cfg.parts:  # a part fills whole feature shards
        say(
            f"note: --parts {cfg.parts}: the run has feature shards for {built} parts (a part holds whole "
            f"ones); smaller shards: `carv-attrib featurize {cfg.run} --shard-size N --overwrite`",
            style="yellow",
        )
