"""The latent cache's rows (RUN/latents/part-*.parquet), written by `encode`, read back as tensors.

One row per manifest clip, failed clips included (status + error): the normalised latent (C, T, h, w)
and the trimmed UMT5 text embedding (L, D), both stored as raw bytes in `latent_dtype` (float32 or
float16), plus the source frames taken.

    for clip in iter_cached(RunDir("runs/demo")):   # ok clips, manifest order
        clip.latent  # float32 (C, T, h, w)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from carv_attrib.data.run import RunDir


@dataclass
class CachedClip:
    clip_id: int
    vid: str
    latent: torch.Tensor  # float32 (C, T, h, w), normalised
    text_emb: torch.Tensor  # float32 (L, D), trimmed to the caption's real tokens


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
            ("decoder", pa.string()),  # "decord" or "pyav" (data/video.py chooses per clip)
            ("frame_timestamps", pa.list_(pa.float64())),  # s after the first displayed frame
            ("decode_reasons", pa.list_(pa.string())),  # why PyAV was used (edit list, rotation, ...)
        ]
    )


def empty_latent_row(clip_id: int, vid: str) -> dict[str, Any]:
    """A row of `latent_schema` with status ok and nothing filled in yet."""
    return {name: None for name in latent_schema().names} | {"clip_id": clip_id, "vid": vid, "status": "ok"}


def as_stored(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """A float32 tensor rounded through the cache's storage dtype, as `row_to_clip` returns it: queries
    get the same rounding as the training clips (float16 caches otherwise differ by ~1e-3)."""
    return torch.from_numpy(x.cpu().numpy().astype(np.dtype(dtype)).astype(np.float32))


def row_to_clip(row: dict[str, Any]) -> CachedClip:
    dt = np.dtype(row["latent_dtype"])
    z = np.frombuffer(row["latent"], dtype=dt).reshape(row["latent_shape"])
    e = np.frombuffer(row["text_emb"], dtype=dt).reshape(row["text_len"], row["text_dim"])
    return CachedClip(
        clip_id=int(row["clip_id"]),
        vid=row["vid"],
        latent=torch.from_numpy(z.astype(np.float32)),
        text_emb=torch.from_numpy(e.astype(np.float32)),
    )


def iter_cached(run: RunDir | Path | str, shard: int | None = None) -> Iterator[CachedClip]:
    """The ok clips of the latent cache (one shard, or all), in manifest order."""
    store = RunDir(run).latents
    shards = [shard] if shard is not None else store.done_shards()
    for i in shards:
        t = pq.read_table(store.shard_path(i))
        for row in t.filter(pc.equal(t.column("status"), "ok")).to_pylist():
            yield row_to_clip(row)
