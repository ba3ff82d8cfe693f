"""The feature stage's rows (RUN/features/part-*.parquet) and their readers.

One row per featurized latent row (`latent_sha` names it): its projected-gradient feature φ (float32, D = sum of the per-checkpoint
blocks), its norm, the weighted K-draw objective, and the draws (σ_k, w_k) that made it. Readers
stream shard by shard, so no caller needs every feature in memory (`feature_matrix` is the
exception, for tests and small runs).

    for ids, feats in iter_feature_blocks(RunDir("runs/demo")):   # (n_s,) int64, (n_s, D) float32
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from carv_attrib.errors import UsageError
from carv_attrib.store.run import RunDir


def feature_schema(dim: int, n_draw_losses: int) -> pa.Schema:
    """Arrow schema of a feature shard: D = `dim`, `n_draw_losses` = checkpoints x K."""
    return pa.schema(
        [
            ("clip_id", pa.int64()),
            ("vid", pa.string()),
            ("latent_sha", pa.string()),  # of the latent row it was computed from (`data.live`)
            ("status", pa.string()),  # "ok" or "nonfinite" (kept out of the index)
            ("feature", pa.list_(pa.float32(), dim)),
            ("feature_norm", pa.float32()),
            ("loss", pa.float32()),  # weighted K-draw objective, mean over checkpoints
            ("draw_losses", pa.list_(pa.float32(), n_draw_losses)),  # per checkpoint, per draw
            ("sigmas", pa.list_(pa.float64())),
            ("weights", pa.list_(pa.float64())),
        ]
    )


def iter_feature_blocks(
    run: RunDir | Path | str, sel: dict[int, list[int]] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(clip ids (n_s,) int64, features (n_s, D) float32) per shard, of the rows `sel` ({shard: rows},
    a snapshot for several passes over a live stage) or, by default, of the live ok features
    (`carv_attrib.store.live`): one row per current clip, none of removed or changed ones."""
    run = RunDir(run)
    sel = run.live_features().ok_selection() if sel is None else sel
    for shard, rows in sel.items():
        block = feature_block(run.features.read_shard(shard, ["clip_id", "feature"]), rows)
        if block is not None:
            yield block
        del block  # one shard in memory at a time


def feature_block(t: pa.Table, rows: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(clip ids (n,) int64, features (n, D) float32) of a feature shard's table (columns clip_id,
    feature) at `rows`; None when no row is taken. `iter_feature_blocks` and the index's Ray parts
    (which read the shard through a pyarrow filesystem) make their blocks with it: the same bytes."""
    if len(rows) != t.num_rows:  # a whole shard (the common case) is used as read: no copy
        t = t.take(pa.array(rows, pa.int64()))
    if t.num_rows == 0:
        return None
    col = t.column("feature")
    col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    d = col.type.list_size
    feats = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
    return t.column("clip_id").to_numpy(), feats


def feature_ids(run: RunDir | Path | str, sel: dict[int, list[int]] | None = None) -> np.ndarray:
    """(n,) int64 clip ids of `sel` (default: the live ok features), in `iter_feature_blocks` order."""
    run = RunDir(run)
    sel = run.live_features().ok_selection() if sel is None else sel
    parts = [
        run.features.read_shard(shard, ["clip_id"])
        .take(pa.array(rows, pa.int64()))
        .column("clip_id")
        .to_numpy()
        for shard, rows in sel.items()
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def feature_matrix(run: RunDir | Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(clip ids (n,) int64, features (n, D) float32) of the live ok features, in memory."""
    blocks = list(iter_feature_blocks(run))
    if not blocks:
        raise UsageError(f"{RunDir(run)} holds no ok features; run featurize first")
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def feature_row(
    clip_id: int,
    vid: str,
    latent_sha: str,
    feature: torch.Tensor,
    losses: torch.Tensor,
    sigma: torch.Tensor,
    weights: torch.Tensor,
    n_ckpt: int,
) -> dict[str, Any]:
    """One row of the schema, computed from the latent row with hash `latent_sha`: feature (D,) and per-draw losses (n_ckpt·K,) float tensors, σ and w (K,)."""
    finite = bool(torch.isfinite(feature).all())
    k = len(sigma)
    return {
        "clip_id": clip_id,
        "vid": vid,
        "latent_sha": latent_sha,
        "status": "ok" if finite else "nonfinite",
        "feature": feature.numpy().astype(np.float32),
        "feature_norm": float(feature.norm()) if finite else float("nan"),
        # Σ_k (w_k/K) ℓ_k per checkpoint, then the mean over checkpoints
        "loss": float((losses.view(n_ckpt, k) * weights.float()).mean(1).mean()),
        "draw_losses": losses.numpy().astype(np.float32),
        "sigmas": sigma.tolist(),
        "weights": weights.tolist(),
    }


def stored_features(run: RunDir | Path | str, ids: Any) -> np.ndarray:
    """(len(ids), D) float32 the live stored features (RUN/features) of clip ids, in that order:
    the clip_id column of every live shard is read, the feature column only of shards holding one.
    KeyError for an id with no live feature."""
    run = RunDir(run)
    want = [int(i) for i in np.asarray(ids).reshape(-1)]
    wanted = set(want)
    sub: dict[int, list[int]] = {}
    for shard, rows in run.live_features().ok_selection().items():
        cids = run.features.read_shard(shard, ["clip_id"]).take(pa.array(rows, pa.int64()))
        hit = [r for r, c in zip(rows, cids.column("clip_id").to_pylist()) if int(c) in wanted]
        if hit:
            sub[shard] = hit
    got: dict[int, np.ndarray] = {}
    for cids, feats in iter_feature_blocks(run, sub):
        got.update(zip((int(c) for c in cids), feats))
    missing = [i for i in want if i not in got]
    if missing:
        raise KeyError(f"clips {missing[:10]} have no live feature in {run}/features")
    if not want:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([got[i] for i in want])
