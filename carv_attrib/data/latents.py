"""Read the latent cache written by `encode` back into tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carv_attrib.data.store import ShardStore


@dataclass
class CachedClip:
    clip_id: int
    vid: str
    latent: Any  # float32 (C, T, h, w), normalised
    text_emb: Any  # float32 (L, D), trimmed to the caption's real tokens


def as_stored(x: Any, dtype: str) -> Any:
    """A float32 tensor rounded through the cache's storage dtype, as `row_to_clip` returns it: queries
    get the same rounding as the training clips (float16 caches otherwise differ by ~1e-3)."""
    import numpy as np
    import torch

    return torch.from_numpy(x.cpu().numpy().astype(np.dtype(dtype)).astype(np.float32))


def row_to_clip(row: dict[str, Any]) -> CachedClip:
    import numpy as np
    import torch

    dt = np.dtype(row["latent_dtype"])
    z = np.frombuffer(row["latent"], dtype=dt).reshape(row["latent_shape"])
    e = np.frombuffer(row["text_emb"], dtype=dt).reshape(row["text_len"], row["text_dim"])
    return CachedClip(
        clip_id=int(row["clip_id"]),
        vid=row["vid"],
        latent=torch.from_numpy(z.astype(np.float32)),
        text_emb=torch.from_numpy(e.astype(np.float32)),
    )


def iter_cached(run: Path, shard: int | None = None) -> Iterator[CachedClip]:
    """The ok clips of the latent cache (one shard, or all), in manifest order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    store = ShardStore(Path(run), "latents")
    shards = [shard] if shard is not None else store.done_shards()
    for i in shards:
        t = pq.read_table(store.shard_path(i))
        for row in t.filter(pc.equal(t.column("status"), "ok")).to_pylist():
            yield row_to_clip(row)
