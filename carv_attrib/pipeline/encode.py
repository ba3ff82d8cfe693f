"""Stage 1, `encode`: decode every clip once, VAE-encode it once, embed each caption once.

This is the "upstream" work that CARV amortises: paid once per clip and cached in Parquet, then
reused by every featurize run (any K, checkpoint, projection).

    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    summary = run_encode(EncodeConfig(manifest="data/manifest.json", videos="data/videos",
                                      model="models/tiny-wan", out="runs/demo"))

Output: RUN/manifest/clips.parquet and RUN/latents/part-NNNNN.parquet, one row per clip (failed
clips included, with status and error), see `LATENT_SCHEMA`. Decoding runs in worker processes
(`DecodePool`) ahead of the main process, which batches the VAE encodes, so the two overlap.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carv_attrib import __version__
from carv_attrib.data.decode_pool import DecodePool
from carv_attrib.data.manifest import (
    ClipTable,
    ManifestOptions,
    read_clip_table,
    read_manifest,
    write_clip_table,
)
from carv_attrib.data.store import ShardStore, now_iso
from carv_attrib.data.video import ClipFailure, DecodedClip, FramePolicy, frames_to_tensor
from carv_attrib.errors import ConfigMismatchError, UsageError

log = logging.getLogger(__name__)

LATENT_DTYPES = ("float32", "float16")


@dataclass
class EncodeConfig:
    manifest: Path | str
    model: str
    out: Path | str
    videos: Path | str | None = None
    manifest_options: ManifestOptions = field(default_factory=ManifestOptions)
    policy: FramePolicy = field(default_factory=FramePolicy)
    batch_size: int = 4
    workers: int = 2
    device: str = "auto"
    dtype: str = "float32"
    latent_dtype: str = "float32"
    shard_size: int = 64
    max_failure_rate: float = 0.05
    decode_timeout: float = 120.0
    overwrite: bool = False

    def identity(self, model_identity: dict[str, Any], manifest_hash: str) -> dict[str, Any]:
        """What changes the stored numbers (and the shard layout): the fingerprinted config."""
        return {
            "model": model_identity,
            "frames": self.policy.frames,
            "height": self.policy.height,
            "width": self.policy.width,
            "fps": self.policy.fps,
            "pad_short": self.policy.pad_short,
            "dtype": self.dtype,
            "latent_dtype": self.latent_dtype,
            "shard_size": self.shard_size,
            "manifest_hash": manifest_hash,
            "text_max_sequence_length": 512,
            "latent": "normalised latent_dist.mode(): (z - latents_mean) / latents_std",
        }


@dataclass
class EncodeSummary:
    run: str
    total: int
    ok: int
    failed: int
    failures: dict[str, int]
    shards_total: int
    shards_skipped: int
    shards_written: int
    seconds: float
    clips_per_s: float
    fingerprint: str
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few failed clips: vid, status, error

    @property
    def failure_rate(self) -> float:
        return self.failed / self.total if self.total else 0.0


ProgressFn = Callable[[str, dict[str, Any]], None]


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def prepare_manifest(run: Path, cfg: EncodeConfig) -> ClipTable:
    """Normalise the manifest into RUN/manifest/clips.parquet (or check it against the one there)."""
    table = read_manifest(cfg.manifest, cfg.videos, cfg.manifest_options)
    path = run / "manifest" / "clips.parquet"
    if path.exists() and not cfg.overwrite:
        old = read_clip_table(path)
        if old.content_hash() != table.content_hash():
            raise ConfigMismatchError(
                f"{run} was encoded from another manifest ({len(old)} clips, hash {old.content_hash()}; "
                f"now {len(table)} clips, hash {table.content_hash()}); use a new --out or pass --overwrite"
            )
    else:
        write_clip_table(table, path)
    return table


def _latent_row(clip_id: int, vid: str) -> dict[str, Any]:
    return {
        "clip_id": clip_id,
        "vid": vid,
        "status": "ok",
        "error": None,
        "latent": None,
        "latent_shape": None,
        "latent_dtype": None,
        "text_emb": None,
        "text_len": None,
        "text_dim": None,
        "frame_indices": None,
        "source_fps": None,
        "fps": None,
    }


def latent_schema() -> Any:
    import pyarrow as pa

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
            ("frame_indices", pa.list_(pa.int32())),  # source frames used
            ("source_fps", pa.float64()),
            ("fps", pa.float64()),  # sampling fps used (0 = consecutive frames)
        ]
    )


class _TextCache:
    """Embeddings of distinct captions; bounded, because a real UMT5 row set is ~1 MB."""

    def __init__(self, wan: Any, capacity: int = 2048):
        self.wan = wan
        self.capacity = capacity
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.encoded = 0

    def get_many(self, captions: list[str]) -> list[Any]:
        from carv_attrib.models.wan import encode_prompts

        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            for cap, emb in zip(missing, encode_prompts(self.wan, missing)):
                self._cache[cap] = emb
            self.encoded += len(missing)
        out = []
        for c in captions:
            self._cache.move_to_end(c)
            out.append(self._cache[c])
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out


def _encode_batch(vae: Any, items: list[tuple[dict[str, Any], DecodedClip]], np_dtype: Any) -> None:
    """VAE-encode decoded clips in one call, filling each row's latent (or its failure)."""
    import torch

    from carv_attrib.models.wan import encode_video

    def fill(row: dict[str, Any], z: Any) -> None:
        if not torch.isfinite(z).all():
            row.update(status="encode_error", error="VAE produced non-finite latents")
            return
        arr = z.numpy().astype(np_dtype)
        row.update(latent=arr.tobytes(), latent_shape=list(arr.shape), latent_dtype=str(arr.dtype))

    try:
        x = torch.stack([frames_to_tensor(c.frames) for _, c in items])  # (B, 3, F, H, W)
        z = encode_video(vae, x)  # (B, C, T, h, w)
        for (row, _), zi in zip(items, z):
            fill(row, zi)
    except Exception:
        # One bad batch must not take its neighbours down: retry clip by clip.
        for row, clip in items:
            try:
                fill(row, encode_video(vae, frames_to_tensor(clip.frames)[None])[0])
            except Exception as exc:
                row.update(status="encode_error", error=f"{type(exc).__name__}: {exc}")


def run_encode(cfg: EncodeConfig, progress: ProgressFn = _noop) -> EncodeSummary:
    import numpy as np
    import pyarrow as pa

    from carv_attrib.models.wan import load_wan, model_identity

    t0 = time.monotonic()
    cfg.policy.validate()
    if cfg.latent_dtype not in LATENT_DTYPES:
        raise UsageError(f"--latent-dtype {cfg.latent_dtype}: choose one of {', '.join(LATENT_DTYPES)}")
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be >= 1")
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    store = ShardStore(run, "latents")
    table = prepare_manifest(run, cfg)
    components = ("vae", "text_encoder", "tokenizer")
    ident = model_identity(cfg.model, components)
    wan = None
    if not all(c.get("files") for c in ident["components"].values()):
        # A Hub id not in the local cache yet: loading downloads it; then its files can be hashed.
        wan = load_wan(cfg.model, components, device=cfg.device, dtype=cfg.dtype)
        ident = model_identity(cfg.model, components)
    config = cfg.identity(ident, table.content_hash())
    fp = store.prepare(config, overwrite=cfg.overwrite, what="encode")

    n = len(table)
    shards = [list(range(s, min(s + cfg.shard_size, n))) for s in range(0, n, cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not store.is_done(i)]
    progress(
        "start",
        {
            "total": n,
            "todo": sum(len(shards[i]) for i in todo),
            "shards": len(shards),
            "skipped": len(shards) - len(todo),
        },
    )

    if todo:
        wan = wan or load_wan(cfg.model, components, device=cfg.device, dtype=cfg.dtype)
        texts = _TextCache(wan)
        caption_of = dict(zip(table.clip_id, table.caption))
        np_dtype = np.dtype(cfg.latent_dtype)
        provenance = {"stage": "latents", "fingerprint": fp, "tool_version": __version__, "config": config}
        tasks = [((si, j), table.path[j]) for si in todo for j in shards[si]]
        rows: dict[int, list[dict[str, Any]]] = {}
        pending: list[tuple[dict[str, Any], DecodedClip]] = []
        timers = Counter()
        shard_t0 = time.monotonic()
        with DecodePool(cfg.policy, workers=cfg.workers, timeout=cfg.decode_timeout) as pool:
            t_wait = time.monotonic()
            for (si, j), result in pool.imap(tasks):
                timers["wait_decode_s"] += time.monotonic() - t_wait
                row = _latent_row(table.clip_id[j], table.vid[j])
                rows.setdefault(si, []).append(row)
                if isinstance(result, ClipFailure):
                    row.update(status=result.kind, error=result.message)
                    progress("clip", {"status": result.kind, "vid": table.vid[j]})
                else:
                    row.update(frame_indices=result.indices, source_fps=result.source_fps, fps=cfg.policy.fps)
                    pending.append((row, result))
                last_of_shard = j == shards[si][-1]
                if len(pending) >= cfg.batch_size or (last_of_shard and pending):
                    t = time.monotonic()
                    _encode_batch(wan.vae, pending, np_dtype)
                    timers["vae_s"] += time.monotonic() - t
                    for r, _ in pending:
                        progress("clip", {"status": r["status"], "vid": r["vid"]})
                    pending = []
                if last_of_shard:
                    t = time.monotonic()
                    shard_rows = rows.pop(si)
                    ok_rows = [r for r in shard_rows if r["status"] == "ok"]
                    for r, emb in zip(ok_rows, texts.get_many([caption_of[r["clip_id"]] for r in ok_rows])):
                        arr = emb.numpy().astype(np_dtype)
                        r.update(text_emb=arr.tobytes(), text_len=arr.shape[0], text_dim=arr.shape[1])
                    timers["text_s"] += time.monotonic() - t
                    kinds = Counter(r["status"] for r in shard_rows)
                    stats = {
                        "shard": si,
                        "clips": len(shard_rows),
                        "ok": kinds.pop("ok", 0),
                        "failures": dict(kinds),
                        "wall_s": round(time.monotonic() - shard_t0, 4),
                        **{k: round(v, 4) for k, v in timers.items()},
                        "finished_at": now_iso(),
                    }
                    store.write_shard(
                        si, pa.Table.from_pylist(shard_rows, schema=latent_schema()), stats, provenance
                    )
                    progress("shard", stats)
                    timers.clear()
                    shard_t0 = time.monotonic()
                t_wait = time.monotonic()

    processed = sum(len(shards[i]) for i in todo)
    return summarize(
        run, store, fp, processed, len(shards), len(shards) - len(todo), len(todo), time.monotonic() - t0
    )


def summarize(
    run: Path,
    store: ShardStore,
    fp: str,
    processed: int,
    shards: int,
    skipped: int,
    written: int,
    seconds: float,
) -> EncodeSummary:
    """Totals over every done shard (not just this invocation's), plus a few failure examples."""
    import pyarrow.compute as pc

    t = store.read_table(columns=["vid", "status", "error"])
    statuses = Counter(t.column("status").to_pylist())
    ok = statuses.pop("ok", 0)
    failed_rows = t.filter(pc.not_equal(t.column("status"), "ok")).slice(0, 5).to_pylist()
    return EncodeSummary(
        run=str(run),
        total=t.num_rows,
        ok=ok,
        failed=sum(statuses.values()),
        failures=dict(statuses),
        shards_total=shards,
        shards_skipped=skipped,
        shards_written=written,
        seconds=round(seconds, 3),
        clips_per_s=round(processed / seconds, 3) if seconds and processed else 0.0,
        fingerprint=fp,
        examples=failed_rows,
    )
