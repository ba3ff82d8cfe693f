"""Build RUN/index from RUN/features: preconditioner + FAISS + `IndexInfo` (index_info.json).

    from carv_attrib.pipeline.index import IndexConfig, build_run_index
    info = build_run_index(IndexConfig(run="runs/demo", precondition="trak"))   # IndexInfo

The index holds the live features (`carv_attrib.store.live`): one per current clip, none of removed or
changed ones, and it records their digest so `score` refuses it once the run changes. Features are
streamed shard by shard, never all in memory: the ids (a cheap column read), then the TRAK Gram, the
training sample of an approximate index, and the vectors, one pass each, all over one snapshot.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from carv_attrib import __version__
from carv_attrib.config import IndexConfig
from carv_attrib.config.resume import recorded_options
from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.pipeline._job import record
from carv_attrib.pipeline.index_parts import (
    PARTS_DIR,
    SHARDS_DIR,
    PartJob,
    fill_part,
    join_vectors,
    merge_parts,
    shard_name,
    split_groups,
)
from carv_attrib.search.index import (
    check_fits,
    check_mergeable,
    check_trainable,
    index_bytes,
    new_index,
    save_index,
    serialize,
    train_index,
    train_sample_rows,
)
from carv_attrib.search.precondition import Preconditioner, fit_preconditioner, trak_bytes
from carv_attrib.search.rerank import fill_index
from carv_attrib.search.sketch import SketchedPreconditioner, indexed_dim, sketch_for
from carv_attrib.space import check_space, space_for
from carv_attrib.store.digests import digest_tree
from carv_attrib.store.features import feature_ids, iter_feature_blocks
from carv_attrib.store.live import LiveLatents
from carv_attrib.store.lock import run_lock
from carv_attrib.store.records import FeaturesRecord, IndexInfo, LatentsRecord
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import now_iso
from carv_attrib.store.uri import local_run, run_uri

__all__ = ["IndexConfig", "build_run_index"]


def _check_features_current(run: RunDir, feats: FeaturesRecord, lat: LatentsRecord | None) -> None:
    now = lat.fingerprint if lat is not None else None
    if feats.latents != now:
        raise ConfigMismatchError(
            f"{run}/features were computed from latents {feats.latents}, but {run}/latents "
            f"now holds {now} (re-encoded since); rerun `carv-attrib featurize {run} "
            "--overwrite ...` before indexing"
        )


def _train_sample(
    run: RunDir, sel: dict[int, list[int]], n: int, dim: int, pre: Preconditioner
) -> np.ndarray:
    """A seeded uniform sample of the preconditioned vectors, (m, D): at most DEFAULT_TRAIN_SAMPLE
    rows and TRAIN_SAMPLE_BYTES (`train_sample_rows`), collected shard by shard."""
    take = train_sample_rows(n, dim)
    chosen = np.sort(np.random.default_rng(0).choice(n, size=take, replace=False))
    parts, start = [], 0
    for _, f in iter_feature_blocks(run, sel):
        local = chosen[(chosen >= start) & (chosen < start + len(f))] - start
        parts.append(pre.prepare_train(f[local]))
        start += len(f)
    return np.concatenate(parts)


def build_run_index(cfg: IndexConfig, use_gpu: bool | None = None) -> IndexInfo:
    """Fit the preconditioner, build the FAISS index and write RUN/index atomically (a crash leaves
    the previous index). cfg.run: a path or a `file://` URI (`store.uri`). cfg.executor "ray": the
    trained empty index is filled in cfg.parts Ray tasks and merged in order, the bytes of the local
    build; cfg.index_shards S > 1: kept as S files, RUN/index/shards/NNNNN.faiss
    (`pipeline.index_parts`). Raises UsageError / ConfigMismatchError (exit 2) for a run without
    features, features older than the latents, a bad factory, a factory that cannot be split (HNSW,
    fast-scan) or more shards than feature shards, Ray missing or unreachable, or a non-file URI;
    RunLockedError (exit 2) while another command writes RUN (unless cfg.wait). Under `featurize` it
    runs in that command's lock. Byte identity holds for CPU builds (the parts add on the CPU; a
    local build on a GPU may assign IVF lists differently)."""
    cfg = dataclasses.replace(cfg.validate(), run=local_run(cfg.run))  # a file:// URI: its path
    with run_lock(cfg.run, "index", wait=cfg.wait):
        return _build_run_index(cfg, use_gpu)


def _build_run_index(cfg: IndexConfig, use_gpu: bool | None) -> IndexInfo:
    run = RunDir(cfg.run)
    frec = run.require_features_record()
    lat = run.latents_record()
    _check_features_current(run, frec, lat)
    prov = run.features.read_provenance() or {}
    live = run.live_latents()
    sel, ids = _live_snapshot(run, live)
    blocks = frec.blocks(prov)  # one per checkpoint
    dim = sum(blocks)
    try:
        # --index-dim: D -> D' after the preconditioner
        sketch = sketch_for(cfg.index_dim, dim, cfg.sketch, cfg.sketch_seed)
        dim_out = indexed_dim(cfg.index_dim, dim)
        index = new_index(dim_out, cfg.index_factory, use_gpu)  # a bad factory is refused before any pass
        check_trainable(index, int(ids.size), cfg.index_factory)
        plan = _parts_plan(cfg, sel, index)  # None: the local sequential build; refused before any pass
        held = _largest_part(plan, int(ids.size), cfg.index_shards)  # held here at once
        check_fits(
            held, dim_out, cfg.index_factory, **_preconditioner_memory(cfg, int(ids.size), dim, blocks, held)
        )
        pre = fit_preconditioner(
            cfg.precondition,
            (f for _, f in iter_feature_blocks(run, sel)) if cfg.precondition == "trak" else None,
            dim=dim,
            blocks=blocks,
            lambda_rel=cfg.lambda_rel,
            num_rows=int(ids.size),  # trak: its form chosen up front, the rows in one buffer
        )
        if sketch is not None:
            pre = SketchedPreconditioner(pre, sketch)
        if not index.is_trained:
            train_index(index, _train_sample(run, sel, ids.size, dim_out, pre), cfg.index_factory)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    keep = cfg.index_factory is not None and cfg.vector_dtype != "none"
    choices = {
        "factory": cfg.index_factory or "Flat",
        "preconditioner": pre.to_dict(),
        "lambda_rel": cfg.lambda_rel,
        "nprobe": cfg.nprobe,
        "rerank_vectors": cfg.vector_dtype if keep else None,
        "sketch": sketch.record() if sketch is not None else None,
        "shards": cfg.index_shards,
        "build": {"executor": cfg.executor, "parts": 1 if plan is None else len(plan)},
    }
    info = IndexInfo.from_records(
        lat, frec, prov, choices, int(ids.size), live.digest(), now_iso(), __version__
    )
    need = _index_disk_bytes(
        int(ids.size), dim_out, cfg.index_factory, cfg.vector_dtype if keep else None, pre
    )
    if plan is not None and cfg.index_shards == 1:  # the part files beside the merged index
        need += index_bytes(int(ids.size), dim_out, cfg.index_factory)
    if plan is not None and keep:  # the parts' re-rank vectors beside their joined copy
        need += int(ids.size) * (dim_out * np.dtype(cfg.vector_dtype).itemsize + 12)
    # the previous index stays live until the swap: the new one needs its own room beside it
    check_space(run.root, need, f"the index of {int(ids.size)} clips")
    vector_dtype = cfg.vector_dtype if keep else None
    with space_for(run.index_dir, need), run.index_swap() as tmp:
        if plan is None:  # one local sequential pass: the reference build
            _add_all(run, sel, index, pre, tmp, dim_out, vector_dtype)
            assert index.ntotal == ids.size, (index.ntotal, ids.size)  # every pass saw the same shards
            save_index(index, tmp / run.faiss_path.name)
        else:
            _add_in_parts(cfg, run, plan, index, pre, tmp, dim_out, vector_dtype, int(ids.size))
        pre.save(tmp / run.preconditioner_dir.name)
        # the checksums of what was just written, checked each time the index is opened
        info = dataclasses.replace(info, files=digest_tree(tmp, skip=(run.index_info_path.name,)))
        info.write(tmp / run.index_info_path.name)
    return info


def _parts_plan(cfg: IndexConfig, sel: dict[int, list[int]], index: Any) -> list[dict[int, list[int]]] | None:
    """The groups of feature shards the parts fill (`index_parts.split_groups`), None for the local
    sequential build (--executor local, one shard). UsageError (exit 2) for a factory that cannot be
    split (`check_mergeable`), or more --index-shards than the run has feature shards."""
    if cfg.executor == "local" and cfg.index_shards == 1:
        return None
    what = "--executor ray" if cfg.index_shards == 1 else f"--index-shards {cfg.index_shards}"
    try:
        check_mergeable(index, cfg.index_factory, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    n_feat = sum(1 for rows in sel.values() if rows)
    if cfg.index_shards > n_feat:
        raise UsageError(
            f"--index-shards {cfg.index_shards}: the run has {n_feat} feature shards and an index shard "
            f"holds whole ones; give at most that many, or write smaller feature shards first: "
            f"`carv-attrib featurize {cfg.run} --shard-size N --overwrite` (recomputes the features)"
        )
    if cfg.index_shards > 1:
        return split_groups(sel, cfg.index_shards)
    return split_groups(sel, cfg.parts or _default_parts(cfg, n_feat))  # at most one part per feature shard


def _default_parts(cfg: IndexConfig, n_feat: int) -> int:
    """--parts unset: this machine's CPUs (`os.cpu_count`), at most one per feature shard (on a
    cluster, give --parts)."""
    import os

    return max(1, min(n_feat, os.cpu_count() or 1))


def _largest_part(plan: list[dict[int, list[int]]] | None, n: int, shards: int) -> int:
    """The vectors one index in memory holds at most: all n, unless the index is kept as shards
    (never merged: each part, here or in a Ray task, is written and dropped), then the largest one."""
    if plan is None or shards == 1:
        return n
    return max(sum(len(rows) for rows in group.values()) for group in plan)


def _add_in_parts(
    cfg: IndexConfig,
    run: RunDir,
    plan: list[dict[int, list[int]]],
    index: Any,
    pre: Preconditioner,
    tmp: Path,
    dim: int,
    vector_dtype: str | None,
    n: int,
) -> None:
    """Fill copies of the trained empty `index` with the groups of `plan` (Ray tasks with --executor
    ray, else one after another here), then merge them in order into tmp/index.faiss, or keep them as
    tmp/shards/NNNNN.faiss (--index-shards); the parts' exact vectors are joined into tmp."""
    tmp = tmp.resolve()
    empty = serialize(index)
    sharded = cfg.index_shards > 1
    out = tmp / (SHARDS_DIR if sharded else PARTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        PartJob(
            part=i,
            run_uri=run_uri(run.root),
            shards=list(group.items()),
            empty=empty,
            pre=pre,
            index_out=str(out / (shard_name(i) if sharded else f"part-{i:05d}.faiss")),
            dim=dim,
            vector_dir=None if vector_dtype is None else str(tmp / PARTS_DIR / f"vectors-{i:05d}"),
            vector_dtype=vector_dtype,
        )
        for i, group in enumerate(plan)
    ]
    try:
        if cfg.executor == "ray":
            from carv_attrib.pipeline.ray_exec import ray_session, run_parts

            with ray_session(cfg.ray_address) as ray:
                shared_empty, shared_pre = ray.put(empty), ray.put(pre)  # one copy for all the parts
                for j in jobs:
                    j.empty, j.pre = shared_empty, shared_pre
                counts = run_parts(fill_part, jobs, ray, use_gpu=False)  # CPU work: adds to FAISS codes
        else:
            counts = [fill_part(j) for j in jobs]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    assert sum(counts) == n, (counts, n)  # every part saw its shards whole
    if not sharded:
        merged = merge_parts(empty, [Path(j.index_out) for j in jobs])
        save_index(merged, tmp / run.faiss_path.name)
    if vector_dtype is not None:
        join_vectors(tmp, jobs, dim, vector_dtype)
    shutil.rmtree(tmp / PARTS_DIR, ignore_errors=True)


def _index_disk_bytes(
    n: int, dim: int, factory: str | None, vector_dtype: str | None, pre: Preconditioner
) -> int:
    """About the bytes RUN/index takes on disk: the FAISS file (`index_bytes`, the memory guide, is
    also its serialised size), the re-rank vectors (n x dim in their dtype, ids and norms) and the
    preconditioner's arrays (trak: per checkpoint a dense float64 d_b² inverse or its n·d_b factor,
    `TrakPreconditioner.nbytes`)."""
    need = index_bytes(n, dim, factory)
    if vector_dtype is not None:
        need += n * (dim * np.dtype(vector_dtype).itemsize + 12)
    return need + int(getattr(pre, "nbytes", 0))


def _preconditioner_memory(
    cfg: IndexConfig, n: int, dim: int, blocks: list[int] | None, held: int | None = None
) -> dict[str, Any]:
    """`check_fits`'s extra for the trak preconditioner of n clips: fitting it (`trak_bytes`'s
    fit_peak) comes before the index fills, its stored arrays and a shard being prepared
    (prepare_peak) stay beside the index while it fills, so the extra is
    max(fit_peak − the index held, prepare_peak), the index held being the `held` clips of the
    largest part or shard (n: the whole index). Blocks unknown (before featurize): one block."""
    if cfg.precondition != "trak":
        return {}
    t = trak_bytes(n, blocks or [dim])
    extra = max(
        t["fit_peak"] - index_bytes(n if held is None else held, dim, cfg.index_factory), t["prepare_peak"]
    )
    return {
        "extra": extra,
        "extra_what": f" and the trak preconditioner ({'/'.join(sorted(set(t['forms'])))})",
    }


def _live_snapshot(run: RunDir, live: LiveLatents) -> tuple[dict[int, list[int]], np.ndarray]:
    """The live features' selection (one snapshot for every pass, even if a featurize run is adding
    shards) and their ids (n,) int64; UsageError when features are missing or none is ok."""
    feats = run.live_features(live)
    if not feats.complete:
        raise UsageError(
            f"{run}/features lacks {len(feats.missing)} of the run's {len(live.ok())} clips (e.g. "
            f"{feats.missing[0][1]}): they were added or changed since; run `carv-attrib featurize {run} ...`"
        )
    sel = feats.ok_selection()
    ids = feature_ids(run, sel)  # one per live clip
    if ids.size == 0:
        raise UsageError(f"{run} holds no ok features; run featurize first")
    return sel, ids


def _add_all(
    run: RunDir,
    sel: dict[int, list[int]],
    index: Any,
    pre: Preconditioner,
    out: Path,
    dim: int,
    vector_dtype: str | None,
) -> None:
    """One streamed pass adding the preconditioned vectors to `index`, writing their exact copies
    (`VectorStore`, into `out`) when vector_dtype is given."""
    # (ids (n_s,), ψ (n_s, D) preconditioned), shard by shard
    psi = ((ids_s, pre.prepare_train(feats_s)) for ids_s, feats_s in iter_feature_blocks(run, sel))
    try:
        fill_index(index, psi, dim, out if vector_dtype is not None else None, vector_dtype or "float16")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def precheck_index(cfg: IndexConfig, dim: int, n: int, blocks: list[int] | None = None) -> None:
    """What `build_run_index` would refuse about the index itself, checked before `featurize`
    computes anything: a factory FAISS cannot build for dim, that n vectors cannot train, or an index
    (with a trak preconditioner over `blocks`, one block of dim when not given) that would not fit in
    the memory available, or an --index-dim not below dim, or a factory that --executor ray /
    --index-shards cannot split (`check_mergeable`). With --index-shards S only one shard is held at
    a time, so memory is sized at ceil(n / S) clips (the build checks the real largest shard).
    UsageError (exit 2)."""
    try:
        sketch_for(cfg.index_dim, dim, cfg.sketch, cfg.sketch_seed)
        dim_out = indexed_dim(cfg.index_dim, dim)  # the FAISS index's; the preconditioner fits at dim
        index = new_index(dim_out, cfg.index_factory, use_gpu=False)
        check_trainable(index, n, cfg.index_factory)
        if cfg.executor != "local" or cfg.index_shards > 1:
            what = (
                "--executor ray"
                if cfg.index_shards == 1
                else f"--index-shards {cfg.index_shards} (kept from the current index unless given)"
            )
            check_mergeable(index, cfg.index_factory, what)
        held = -(-n // max(1, cfg.index_shards))
        check_fits(held, dim_out, cfg.index_factory, **_preconditioner_memory(cfg, n, dim, blocks, held))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


INDEX_FLAGS = {
    "precondition": "--precondition",
    "lambda_rel": "--lambda",
    "index_factory": "--index-factory",
    "nprobe": "--nprobe",
    "vector_dtype": "--vector-dtype",
    "index_dim": "--index-dim",
    "sketch": "--sketch",
    "sketch_seed": "--sketch-seed",
    "index_shards": "--index-shards",
}


def index_config_keeping(run: Path | str, given: dict[str, Any]) -> tuple[IndexConfig, dict[str, Any]]:
    """The IndexConfig for a rebuild by `featurize`: options given (not None) win; the others keep
    the run's current index's choices, so an index built with `carv-attrib index --precondition trak`
    stays trak. Returns it validated (bad options refused before any work), and the kept choices
    that differ from the defaults as {flag: value}, for the message."""
    explicit = {k: v for k, v in given.items() if v is not None}
    previous: dict[str, Any] = {}
    r = RunDir(run)
    if r.index_info_path.exists():
        info = r.index_info(check_fresh=False)
        previous = {
            "precondition": info.preconditioner["kind"],
            "lambda_rel": info.lambda_rel,
            "index_factory": None if info.factory == "Flat" else info.factory,
            "nprobe": info.nprobe,
            "index_dim": info.sketch["out_dim"] if info.sketch else None,
            "index_shards": info.shards,
        }
        if info.sketch and explicit.get("index_dim", 1):  # --index-dim 0 drops the sketch, kind and seed too
            previous["sketch"] = info.sketch["kind"]
            previous["sketch_seed"] = int(info.sketch.get("seed", 0))
        if info.factory != "Flat":  # a Flat index keeps no vectors: nothing to carry over
            previous["vector_dtype"] = info.rerank_vectors or "none"
    cfg = IndexConfig(run=run, **{**previous, **explicit}).validate()
    default = IndexConfig(run=run)
    kept = {
        INDEX_FLAGS[k]: v
        for k, v in previous.items()
        if k not in explicit and v is not None and v != getattr(default, k)
    }
    return cfg, kept


def run_index(cfg: IndexConfig) -> IndexInfo:
    """`carv-attrib index`: rebuild RUN/index (`build_run_index`) without recomputing gradients, and
    record the invocation in RUN/run.json. Raises UsageError / ConfigMismatchError (exit 2)."""
    started = time.monotonic()
    cfg = dataclasses.replace(cfg.validate(), run=local_run(cfg.run))
    with run_lock(cfg.run, "index", wait=cfg.wait):  # the record too: one writer's whole command
        info = build_run_index(cfg)
        record(
            cfg.run,
            "index",
            started=started,
            preconditioner=info.preconditioner,
            options=recorded_options(cfg),
        )
    return info
