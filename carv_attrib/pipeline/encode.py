"""Stage 1, `encode`: decode every clip once, VAE-encode it once, embed each caption once.

This is the "upstream" work that CARV amortises: paid once per clip and cached in Parquet, then
reused by every featurize run (any K, checkpoint, projection).

    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    summary = run_encode(EncodeConfig(manifest="data/manifest.json", videos="data/videos",
                                      model="models/tiny-wan", run="runs/demo"))

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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from carv_attrib import __version__
from carv_attrib.config import EncodeConfig
from carv_attrib.data.decode_pool import DecodePool
from carv_attrib.data.latents import empty_latent_row, latent_schema
from carv_attrib.data.manifest import ClipTable, read_clip_table, read_manifest, write_clip_table
from carv_attrib.data.run import RunDir
from carv_attrib.data.store import ShardStore, now_iso
from carv_attrib.data.video import ClipFailure, DecodedClip, failure_message, frames_to_tensor
from carv_attrib.errors import ConfigMismatchError
from carv_attrib.models.identity import ENCODER_COMPONENTS, model_identity
from carv_attrib.models.wan import WanModel, encode_prompts, encode_video, load_wan

log = logging.getLogger(__name__)

FRAME_SELECTION = "displayed-at-k/fps-v1"

__all__ = ["EncodeConfig", "EncodeSummary", "run_encode"]


def latents_identity(cfg: EncodeConfig, model_ident: dict[str, Any], manifest_hash: str) -> dict[str, Any]:
    """What changes the stored numbers (and the shard layout): the fingerprinted stage config."""
    policy = cfg.policy
    return {
        "model": model_ident,
        "frames": policy.frames,
        "height": policy.height,
        "width": policy.width,
        "fps": policy.fps,
        "pad_short": policy.pad_short,
        "dtype": cfg.dtype,
        "latent_dtype": cfg.latent_dtype,
        "shard_size": cfg.shard_size,
        "manifest_hash": manifest_hash,
        "text_max_sequence_length": 512,
        "latent": "normalised latent_dist.mode(): (z - latents_mean) / latents_std",
        # frame k = the frame displayed at k/fps after the first displayed one (edit lists, VFR,
        # rotation and SAR honoured; data/video.py): latents from the older index rule never mix in
        "frame_selection": FRAME_SELECTION,
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


def prepare_manifest(run: RunDir, cfg: EncodeConfig) -> ClipTable:
    """Normalise the manifest into RUN/manifest/clips.parquet (or check it against the one there)."""
    table = read_manifest(cfg.manifest, cfg.videos, cfg.manifest_options)
    path = run.manifest_table
    if path.exists() and not cfg.overwrite:
        old = read_clip_table(path)
        if old.content_hash() != table.content_hash():
            raise ConfigMismatchError(
                f"{run} was encoded from another manifest ({len(old)} clips, hash {old.content_hash()}; "
                f"now {len(table)} clips, hash {table.content_hash()}); use a new --run or pass --overwrite"
            )
    else:
        write_clip_table(table, path)
    return table


class _TextCache:
    """Embeddings of distinct captions; bounded, because a real UMT5 row set is ~1 MB."""

    def __init__(self, wan: WanModel, capacity: int = 2048):
        self.wan = wan
        self.capacity = capacity
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.encoded = 0

    def get_many(self, captions: list[str]) -> list[torch.Tensor]:
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


def _encode_batch(vae: Any, items: list[tuple[dict[str, Any], DecodedClip]], np_dtype: np.dtype) -> None:
    """VAE-encode decoded clips in one call, filling each row's latent (or its failure)."""

    def fill(row: dict[str, Any], z: torch.Tensor) -> None:
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


def _identify_model(cfg: EncodeConfig) -> tuple[dict[str, Any], WanModel | None]:
    """The encoder components' identity (file hashes). A Hub id not in the local cache yet has no
    files to hash: loading downloads it (the loaded model is returned for reuse), then it is hashed."""
    ident = model_identity(cfg.model, ENCODER_COMPONENTS)
    if all(c.get("files") for c in ident["components"].values()):
        return ident, None
    wan = load_wan(cfg.model, ENCODER_COMPONENTS, device=cfg.device, dtype=cfg.dtype)
    return model_identity(cfg.model, ENCODER_COMPONENTS), wan


class _ShardEncoder:
    """Turns decoded clips into latent rows: VAE batches of `batch_size`, captions embedded once per
    distinct text at the end of each shard, then the shard written with its stats."""

    def __init__(
        self, cfg: EncodeConfig, wan: WanModel, store: ShardStore, table: ClipTable, provenance: dict
    ):
        self.cfg, self.wan, self.store, self.provenance = cfg, wan, store, provenance
        self.texts = _TextCache(wan)
        self.caption_of = dict(zip(table.clip_id, table.caption))
        self.np_dtype = np.dtype(cfg.latent_dtype)
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self.pending: list[tuple[dict[str, Any], DecodedClip]] = []
        self.timers: Counter[str] = Counter()
        self.shard_t0 = time.monotonic()

    def add(
        self, shard: int, row: dict[str, Any], result: DecodedClip | ClipFailure, progress: ProgressFn
    ) -> None:
        self.rows.setdefault(shard, []).append(row)
        if isinstance(result, ClipFailure):
            row.update(status=result.kind, error=failure_message(result, "encode"))
            progress("clip", {"status": result.kind, "vid": row["vid"]})
        else:
            row.update(
                frame_indices=result.indices,
                source_fps=result.source_fps,
                fps=self.cfg.fps,
                decoder=result.decoder,
                frame_timestamps=result.timestamps,
                decode_reasons=result.reasons,
            )
            self.pending.append((row, result))

    def flush(self, progress: ProgressFn) -> None:
        """VAE-encode the pending clips in one call."""
        if not self.pending:
            return
        t = time.monotonic()
        _encode_batch(self.wan.vae, self.pending, self.np_dtype)
        self.timers["vae_s"] += time.monotonic() - t
        for r, _ in self.pending:
            progress("clip", {"status": r["status"], "vid": r["vid"]})
        self.pending = []

    def finish_shard(self, shard: int, progress: ProgressFn) -> None:
        """Embed the shard's captions, write it and its done marker."""
        t = time.monotonic()
        shard_rows = self.rows.pop(shard)
        ok_rows = [r for r in shard_rows if r["status"] == "ok"]
        for r, emb in zip(ok_rows, self.texts.get_many([self.caption_of[r["clip_id"]] for r in ok_rows])):
            arr = emb.numpy().astype(self.np_dtype)  # (L, D)
            r.update(text_emb=arr.tobytes(), text_len=arr.shape[0], text_dim=arr.shape[1])
        self.timers["text_s"] += time.monotonic() - t
        kinds = Counter(r["status"] for r in shard_rows)
        stats = {
            "shard": shard,
            "clips": len(shard_rows),
            "ok": kinds.pop("ok", 0),
            "failures": dict(kinds),
            "wall_s": round(time.monotonic() - self.shard_t0, 4),
            **{k: round(v, 4) for k, v in self.timers.items()},
            "finished_at": now_iso(),
        }
        table = pa.Table.from_pylist(shard_rows, schema=latent_schema())
        self.store.write_shard(shard, table, stats, self.provenance)
        progress("shard", stats)
        self.timers.clear()
        self.shard_t0 = time.monotonic()


def run_encode(cfg: EncodeConfig, progress: ProgressFn = _noop) -> EncodeSummary:
    """Encode (or resume) RUN/latents for `cfg`. Raises UsageError / ConfigMismatchError (exit 2) for
    bad options, a bad manifest or a run made with other settings; per-clip failures are recorded."""
    t0 = time.monotonic()
    cfg.validate()
    run = RunDir(cfg.run)
    run.root.mkdir(parents=True, exist_ok=True)
    table = prepare_manifest(run, cfg)
    ident, wan = _identify_model(cfg)
    config = latents_identity(cfg, ident, table.content_hash())
    store = run.latents
    fp = store.prepare(config, overwrite=cfg.overwrite, what="encode")

    n = len(table)
    shards = [list(range(s, min(s + cfg.shard_size, n))) for s in range(0, n, cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not store.is_done(i)]
    todo_clips = sum(len(shards[i]) for i in todo)
    progress(
        "start", {"total": n, "todo": todo_clips, "shards": len(shards), "skipped": len(shards) - len(todo)}
    )
    if todo:
        wan = wan or load_wan(cfg.model, ENCODER_COMPONENTS, device=cfg.device, dtype=cfg.dtype)
        provenance = {"stage": "latents", "fingerprint": fp, "tool_version": __version__, "config": config}
        encoder = _ShardEncoder(cfg, wan, store, table, provenance)
        tasks = [((si, j), table.path[j]) for si in todo for j in shards[si]]
        with DecodePool(cfg.policy, workers=cfg.workers, timeout=cfg.decode_timeout) as pool:
            t_wait = time.monotonic()
            for (si, j), result in pool.imap(tasks):  # decoding in workers overlaps the VAE here
                encoder.timers["wait_decode_s"] += time.monotonic() - t_wait
                encoder.add(si, empty_latent_row(table.clip_id[j], table.vid[j]), result, progress)
                last_of_shard = j == shards[si][-1]
                if len(encoder.pending) >= cfg.batch_size or last_of_shard:
                    encoder.flush(progress)
                if last_of_shard:
                    encoder.finish_shard(si, progress)
                t_wait = time.monotonic()
    return summarize(
        run, fp, todo_clips, len(shards), len(shards) - len(todo), len(todo), time.monotonic() - t0
    )


def summarize(
    run: RunDir,
    fp: str,
    processed: int,
    shards: int,
    skipped: int,
    written: int,
    seconds: float,
) -> EncodeSummary:
    """Totals over every done shard (not just this invocation's), plus a few failure examples."""
    t = run.latents.read_table(columns=["vid", "status", "error"])
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
