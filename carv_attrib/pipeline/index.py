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
from carv_attrib.errors import ConfigMismatchError, UsageError

INDEX_SCHEMA_VERSION = 1


def build_run_index(
    run: Path | str,
    precondition: str = "cosine",
    lambda_rel: float = 1e-2,
    factory: str | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    import numpy as np

    from carv_attrib.attrib.index import DEFAULT_TRAIN_SAMPLE, add_vectors, new_index, save_index, train_index
    from carv_attrib.attrib.precondition import PRECONDITIONERS, fit_preconditioner
    from carv_attrib.pipeline.featurize import feature_ids, iter_feature_blocks

    run = Path(run)
    if precondition not in PRECONDITIONERS:
        raise UsageError(f"--precondition {precondition}: choose one of {', '.join(PRECONDITIONERS)}")
    features = ShardStore(run, "features")
    fcfg = features.read_config()
    if fcfg is None:
        raise UsageError(f"{run} has no features; run `carv-attrib featurize {run} ...` first")
    lat = ShardStore(run, "latents").read_config() or {}
    if fcfg["config"].get("latents") != lat.get("fingerprint"):
        raise ConfigMismatchError(
            f"{run}/features were computed from latents {fcfg['config'].get('latents')}, but {run}/latents "
            f"now holds {lat.get('fingerprint')} (re-encoded since); rerun `carv-attrib featurize {run} "
            "--overwrite ...` before indexing"
        )
    prov = features.read_provenance() or {}

    # Features are streamed shard by shard, never all in memory: the ids (a cheap column read), then
    # the TRAK Gram, the training sample of an approximate index, and the vectors, one pass each.
    shards = features.done_shards()  # one snapshot for every pass, even if a featurize run is adding shards
    ids = feature_ids(run, shards=shards)  # (n,) int64
    if ids.size == 0:
        raise UsageError(f"{run} holds no ok features; run featurize first")
    if np.unique(ids).size != ids.size:
        raise UsageError(f"{run}/features holds duplicate clip ids; rerun featurize with --overwrite")
    n_ckpt = len(fcfg["config"]["transformers"])
    blocks = prov.get("blocks") or [int(fcfg["config"]["projector"]["dim"])] * n_ckpt  # one per checkpoint
    dim = sum(blocks)
    try:
        pre = fit_preconditioner(
            precondition,
            (f for _, f in iter_feature_blocks(run, shards=shards)) if precondition == "trak" else None,
            dim=dim,
            blocks=blocks,
            lambda_rel=lambda_rel,
        )
        index = new_index(dim, factory, use_gpu)
        if not index.is_trained:  # a seeded uniform sample of the (preconditioned) vectors
            sample_parts = []
            take = min(ids.size, DEFAULT_TRAIN_SAMPLE)
            chosen = np.sort(np.random.default_rng(0).choice(ids.size, size=take, replace=False))
            start = 0
            for _, f in iter_feature_blocks(run, shards=shards):
                local = chosen[(chosen >= start) & (chosen < start + len(f))] - start
                sample_parts.append(pre.prepare_train(f[local]))
                start += len(f)
            train_index(index, np.concatenate(sample_parts), factory)
        for ids_s, feats_s in iter_feature_blocks(run, shards=shards):
            add_vectors(index, ids_s, pre.prepare_train(feats_s))
        assert index.ntotal == ids.size, (index.ntotal, ids.size)  # every pass saw the same shards
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    out = run / "index"
    tmp = run / ".index.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_index(index, tmp / "index.faiss")
    pre.save(tmp / "preconditioner")
    info = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "tool_version": __version__,
        "created_at": now_iso(),
        "fingerprint": fcfg["fingerprint"],
        "count": int(ids.size),
        "dim": int(dim),
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
    """RUN/index/index_info.json, refused when the run's latents or features changed after indexing."""
    path = Path(run) / "index" / "index_info.json"
    if not path.exists():
        raise UsageError(f"{run} has no index; run `carv-attrib featurize` (or `carv-attrib index`) first")
    info = read_json(path)
    for stage, key in (("latents", "latents_fingerprint"), ("features", "fingerprint")):
        now = (ShardStore(run, stage).read_config() or {}).get("fingerprint")
        if now != info.get(key):
            raise ConfigMismatchError(
                f"{run}/index is stale: it was built from {stage} {info.get(key)}, but {run}/{stage} now "
                f"holds {now}; rerun `carv-attrib featurize {run} ...` (or `carv-attrib index {run}`)"
            )
    return info
