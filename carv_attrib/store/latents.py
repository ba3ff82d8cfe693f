"""The latent cache's rows (RUN/latents/part-*.parquet), written by `encode`, read back as tensors.

One row per encoded clip, failed clips included (status + error): the normalised latent (C, T, h, w)
and the trimmed UMT5 text embedding (L, D), both stored as raw bytes in `latent_dtype` (float32 or
float16), the source frames taken, what the row was made from (the clip's source key and file
identity, `carv_attrib.store.sources`) and the hash of its bytes (`latent_sha`, what features key on).
Shards are only appended; which rows are current is `carv_attrib.store.live`'s business.

    for clip in iter_cached(RunDir("runs/demo")):   # the live ok clips, in storage order
        clip.latent  # float32 (C, T, h, w)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from carv_attrib.store.live import selection
from carv_attrib.store.run import RunDir
from carv_attrib.store.sources import SourceId
from carv_attrib.video.motion import MOTION_DTYPE


@dataclass
class CachedClip:
    clip_id: int
    vid: str
    latent: torch.Tensor  # float32 (C, T, h, w), normalised
    text_emb: torch.Tensor  # float32 (L, D), trimmed to the caption's real tokens
    motion: torch.Tensor | None = None  # float32 (T, h, w) flow magnitudes (encode --motion-masks)


def latent_schema() -> pa.Schema:
    """Arrow schema of a latent shard."""
    return pa.schema(
        [
            ("clip_id", pa.int64()),
            ("vid", pa.string()),
            ("status", pa.string()),  # "ok" or a failure kind: missing, decode_error, timeout, crash, ...
            ("error", pa.string()),
            ("latent", pa.binary()),  # row-major bytes of the normalised latent (C, T, h, w)
            ("latent_shape", pa.list_(pa.int32())),
            ("latent_dtype", pa.string()),
            ("text_emb", pa.binary()),  # (text_len, text_dim) trimmed UMT5 embedding, same dtype
            ("text_len", pa.int32()),
            ("text_dim", pa.int32()),
            ("frame_indices", pa.list_(pa.int32())),  # display-order source frames taken
            ("source_fps", pa.float64()),
            ("fps", pa.float64()),  # sampling fps used (0 = consecutive frames)
            ("decoder", pa.string()),  # "decord" or "pyav" (video/decode.py chooses per clip)
            ("frame_timestamps", pa.list_(pa.float64())),  # s after the first displayed frame
            ("decode_reasons", pa.list_(pa.string())),  # why PyAV was used (edit list, rotation, ...)
            ("source_key", pa.string()),  # sha256(file content, caption), `data.sources.source_key`
            ("source_size", pa.int64()),  # bytes; null: the file was missing
            ("source_mtime_ns", pa.int64()),
            ("source_sha256", pa.string()),
            ("latent_sha", pa.string()),  # `data.live.latent_sha` of latent + text_emb; null unless ok
            # (T, h, w) float16 |optical flow| in px/frame on the latent grid (`data.motion`); null
            # unless encoded with --motion-masks (shards written before this column lack it)
            ("motion", pa.binary()),
            ("motion_shape", pa.list_(pa.int32())),
            # frames past the clip's end, repeats of its last frame (encode --pad-short); 0: none; null
            # for failed clips (shards written before this column lack it)
            ("padded_frames", pa.int32()),
        ]
    )


def empty_latent_row(clip_id: int, vid: str, key: str, ident: SourceId) -> dict[str, Any]:
    """A row of `latent_schema` with status ok, its source filled in and nothing else yet."""
    return {name: None for name in latent_schema().names} | {
        "clip_id": clip_id,
        "vid": vid,
        "status": "ok",
        "source_key": key,
        "source_size": ident.size,
        "source_mtime_ns": ident.mtime_ns,
        "source_sha256": ident.sha256,
    }


def as_stored(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """A float32 tensor rounded through the cache's storage dtype, as `row_to_clip` returns it: queries
    get the same rounding as the training clips (float16 caches otherwise differ by ~1e-3)."""
    return torch.from_numpy(x.cpu().numpy().astype(np.dtype(dtype)).astype(np.float32))


def row_to_clip(row: dict[str, Any]) -> CachedClip:
    dt = np.dtype(row["latent_dtype"])
    z = np.frombuffer(row["latent"], dtype=dt).reshape(row["latent_shape"])
    e = np.frombuffer(row["text_emb"], dtype=dt).reshape(row["text_len"], row["text_dim"])
    motion = None
    if row.get("motion") is not None:
        m = np.frombuffer(row["motion"], dtype=MOTION_DTYPE).reshape(row["motion_shape"])
        motion = torch.from_numpy(m.astype(np.float32))
    return CachedClip(
        clip_id=int(row["clip_id"]),
        vid=row["vid"],
        latent=torch.from_numpy(z.astype(np.float32)),
        text_emb=torch.from_numpy(e.astype(np.float32)),
        motion=motion,
    )


def read_latents(run: RunDir | Path | str, sel: dict[int, list[int]]) -> Iterator[CachedClip]:
    """The rows `sel` ({shard: rows}, `carv_attrib.store.live.selection`) as clips, one shard in memory
    at a time, shards in order."""
    store = RunDir(run).latents
    for shard, rows in sel.items():
        t = store.read_shard(shard).take(pa.array(rows, pa.int64()))
        for row in t.to_pylist():
            yield row_to_clip(row)


def iter_cached(run: RunDir | Path | str) -> Iterator[CachedClip]:
    """The live ok clips of the latent cache (one per committed manifest clip whose encode succeeded),
    in storage order: manifest order for a run encoded in one go."""
    run = RunDir(run)
    yield from read_latents(run, selection([row.where for _, _, row in run.live_latents().ok()]))
