"""Build RUN/index from RUN/features: preconditioner + FAISS + index_info.json.

`index_info.json` holds everything `score` needs to treat a query exactly like the training clips:
model and checkpoint fingerprints, encode settings, draw rule (seed, scheme, density, proposal),
output function, projector spec, preconditioner, dims and count.

    info = build_run_index("runs/demo", precondition="trak", lambda_rel=1e-2)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from carv_attrib import __version__
from carv_attrib.data.store import ShardStore, now_iso, read_json, write_json_atomic
from carv_attrib.errors import UsageError

INDEX_SCHEMA_VERSION = 1


def build_run_index(
    run: Path | str,
    precondition: str = "cosine",
    lambda_rel: float = 1e-2,
    factory: str | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    import numpy as np

    from carv_attrib.attrib.index import build_index, save_index
    from carv_attrib.attrib.precondition import PRECONDITIONERS, fit_preconditioner
    from carv_attrib.pipeline.featurize import feature_matrix

    run = Path(run)
    if precondition not in PRECONDITIONERS:
        raise UsageError(f"--precondition {precondition}: choose one of {', '.join(PRECONDITIONERS)}")
    features = ShardStore(run, "features")
    fcfg = features.read_config()
    if fcfg is None:
        raise UsageError(f"{run} has no features; run `carv-attrib featurize {run} ...` first")
    prov = features.read_provenance() or {}
    ids, feats = feature_matrix(run)
    order = np.argsort(ids, kind="stable")
    ids, feats = ids[order], feats[order]
    blocks = prov.get("blocks") or [feats.shape[1]]
    try:
        pre = fit_preconditioner(
            precondition, feats, dim=feats.shape[1], blocks=blocks, lambda_rel=lambda_rel
        )
        index = build_index(ids, pre.prepare_train(feats), factory=factory, use_gpu=use_gpu)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    out = run / "index"
    tmp = run / ".index.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_index(index, tmp / "index.faiss")
    pre.save(tmp / "preconditioner")
    lat = ShardStore(run, "latents").read_config() or {}
    info = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "tool_version": __version__,
        "created_at": now_iso(),
        "fingerprint": fcfg["fingerprint"],
        "count": int(len(ids)),
        "dim": int(feats.shape[1]),
        "blocks": blocks,
        "factory": factory or "Flat",
        "preconditioner": pre.to_dict(),
        "features": fcfg["config"],
        "checkpoints": prov.get("checkpoints"),
        "checkpoint_paths": prov.get("checkpoint_paths"),
        "model_source": lat.get("config", {}).get("model", {}).get("source"),
        "encode": {k: v for k, v in lat.get("config", {}).items() if k != "manifest_hash"},
        "latents_fingerprint": lat.get("fingerprint"),
    }
    write_json_atomic(tmp / "index_info.json", info)
    # Swap the finished directory in: a crash mid-build leaves the previous index intact.
    old = run / ".index.old"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return info


def read_index_info(run: Path | str) -> dict[str, Any]:
    path = Path(run) / "index" / "index_info.json"
    if not path.exists():
        raise UsageError(f"{run} has no index; run `carv-attrib featurize` (or `carv-attrib index`) first")
    return read_json(path)
