"""Which stored rows are current: the live view of a run that grows, shrinks and changes.

Stages only ever append shards. A latent row is *live* when its clip is in the committed manifest
(RUN/manifest/clips.parquet, `carv_attrib.store.sources`) and it is the latest done row with that clip's
source key; a feature row is live when it was computed from a live latent, identified by the
latent's content hash (`latent_sha`: sha256 of the stored latent and text-embedding bytes). Rows of
removed, changed or re-encoded clips stay in their shards, never read as data.

So `featurize` computes exactly the live latents without a feature row, and an index is current when
it was built from the live set it records (`LiveLatents.digest`).

Every function here reads a few key columns of each done shard (never the latents or features):
about 1 s per million rows.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from carv_attrib.errors import ConfigMismatchError, DamagedFileError
from carv_attrib.store.shards import ShardStore
from carv_attrib.store.sources import SourcedClips

Where = tuple[int, int]  # (shard, row within the shard)


def latent_sha(latent: bytes, text_emb: bytes) -> str:
    """sha256 of a latent row's stored bytes (latent, then text embedding), 16 hex: what its feature
    is a function of, beside the featurize configuration."""
    h = hashlib.sha256(latent)
    h.update(text_emb)
    return h.hexdigest()[:16]


def _key_columns(store: ShardStore, shard: int, columns: list[str]) -> dict[str, list]:
    path = store.shard_path(shard)
    names = store.read_shard_schema(shard).names
    absent = [c for c in columns if c not in names]
    if absent:
        raise ConfigMismatchError(
            f"{path} was written by an older carv-attrib (no {', '.join(absent)} column); "
            f"re-encode this run with `--overwrite` (or start a new --run)"
        )
    return store.read_shard(shard, columns).to_pydict()


@dataclass
class LatentRow:
    where: Where
    status: str
    latent_sha: str | None


def latent_rows(store: ShardStore) -> dict[tuple[int, str], LatentRow]:
    """(clip_id, source_key) -> the latest done row with that key (shards in order, a retry wins)."""
    out: dict[tuple[int, str], LatentRow] = {}
    for s in store.done_shards():
        d = _key_columns(store, s, ["clip_id", "source_key", "status", "latent_sha"])
        for r, (cid, key, st, sha) in enumerate(
            zip(d["clip_id"], d["source_key"], d["status"], d["latent_sha"])
        ):
            out[(cid, key)] = LatentRow((s, r), st, sha)
    return out


def hashes_in_rows(store: ShardStore, path_of: dict[int, str]) -> dict[tuple[str, int, int], str]:
    """(path, size, mtime_ns) -> sha256 recorded in the done latent rows, for the clips of `path_of`
    (clip_id -> path): `encode` does not read those files again (parts write rows before any manifest
    is committed, so the commit pass would otherwise re-hash every file)."""
    out: dict[tuple[str, int, int], str] = {}
    for s in store.done_shards():
        d = _key_columns(store, s, ["clip_id", "source_size", "source_mtime_ns", "source_sha256"])
        for cid, size, mtime, sha in zip(
            d["clip_id"], d["source_size"], d["source_mtime_ns"], d["source_sha256"]
        ):
            path = path_of.get(cid)
            if path is not None and sha is not None and size is not None and mtime is not None:
                out[(path, size, mtime)] = sha
    return out


def feature_rows(store: ShardStore) -> tuple[dict[tuple[int, str], tuple[Where, str]], int]:
    """(clip_id, latent_sha) -> (where, status) of the first done feature row per key, and the number
    of done rows."""
    out: dict[tuple[int, str], tuple[Where, str]] = {}
    total = 0
    for s in store.done_shards():
        d = _key_columns(store, s, ["clip_id", "latent_sha", "status"])
        for r, (cid, sha, st) in enumerate(zip(d["clip_id"], d["latent_sha"], d["status"])):
            out.setdefault((cid, sha), ((s, r), st))
        total += len(d["clip_id"])
    return out, total


def selection(wheres: list[Where]) -> dict[int, list[int]]:
    """{shard: sorted rows}: what to read of each shard."""
    out: dict[int, list[int]] = defaultdict(list)
    for s, r in wheres:
        out[s].append(r)
    return {s: sorted(rows) for s, rows in sorted(out.items())}


@dataclass
class LiveLatents:
    """The live latent row of each clip of the committed manifest, in manifest order.

    `pending` lists the manifest clips with no done row (only after RUN/latents was edited by hand or
    an `--overwrite` encode was interrupted); `rows_total` counts every done row, live or not.
    """

    clip_id: list[int] = field(default_factory=list)
    vid: list[str] = field(default_factory=list)
    rows: list[LatentRow] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    rows_total: int = 0

    def __len__(self) -> int:
        return len(self.clip_id)

    def ok(self) -> list[tuple[int, str, LatentRow]]:
        """(clip_id, vid, row) of the live clips whose latent is ok."""
        return [(c, v, r) for c, v, r in zip(self.clip_id, self.vid, self.rows) if r.status == "ok"]

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            out[r.status] += 1
        return dict(out)

    def digest(self) -> str:
        """sha256 (16 hex) of the sorted (clip_id, latent_sha) of the ok live clips: what an index
        built from them holds. Any added, removed, changed or re-encoded clip changes it."""
        h = hashlib.sha256()
        for cid, sha in sorted((c, r.latent_sha) for c, _, r in self.ok()):
            h.update(f"{cid}:{sha}\n".encode())
        return h.hexdigest()[:16]


def live_latents(manifest_path: Path, store: ShardStore) -> LiveLatents:
    """The live view of a latents stage under its committed manifest (empty without one)."""
    try:
        clips = SourcedClips.read(manifest_path)
    except (pa.ArrowException, OSError) as exc:  # truncated or changed bytes
        raise DamagedFileError(
            f"{manifest_path} is damaged ({str(exc).splitlines()[0]}); remove it and rerun `carv-attrib "
            f"encode MANIFEST -r {manifest_path.parent.parent} ...` with the manifest and options the run "
            "was encoded with: it writes the manifest again and encodes no clip already encoded"
        ) from exc
    if clips is None or store.read_config() is None:
        return LiveLatents()
    rows = latent_rows(store)
    live = LiveLatents(rows_total=sum(s.get("clips", 0) for s in store.read_stats()))
    for cid, vid, key in zip(clips.clips.clip_id, clips.clips.vid, clips.keys):
        row = rows.get((cid, key))
        if row is None:
            live.pending.append(vid)
            continue
        live.clip_id.append(cid)
        live.vid.append(vid)
        live.rows.append(row)
    return live


@dataclass
class LiveFeatures:
    """The feature rows of the live ok latents: `rows` those computed, `missing` those not yet.
    `rows_total` counts every done feature row, live or not."""

    rows: dict[int, tuple[Where, str]]  # clip_id -> (where, status)
    missing: list[tuple[int, str, LatentRow]]  # (clip_id, vid, latent row) without a feature
    had_feature: set[int]  # clip ids with any feature row (a missing one of these is "changed")
    rows_total: int

    def ok_selection(self) -> dict[int, list[int]]:
        return selection([w for w, st in self.rows.values() if st == "ok"])

    @property
    def complete(self) -> bool:
        return not self.missing


def live_features(live: LiveLatents, store: ShardStore) -> LiveFeatures:
    """Which live ok latents have a feature row in `store` (a features stage made from them)."""
    if store.read_config() is None:
        return LiveFeatures({}, live.ok(), set(), 0)
    rows, total = feature_rows(store)
    found: dict[int, tuple[Where, str]] = {}
    missing = []
    for cid, vid, row in live.ok():
        hit = rows.get((cid, row.latent_sha))
        if hit is None:
            missing.append((cid, vid, row))
        else:
            found[cid] = hit
    return LiveFeatures(found, missing, {cid for cid, _ in rows}, total)
