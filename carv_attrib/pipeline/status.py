"""What a run directory holds: stages, shards, clip statuses, fingerprints (`carv-attrib status`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.store.lock import holder, is_written
from carv_attrib.store.records import IndexSummary, RunLog, StageRecord
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import ShardStore


@dataclass(frozen=True)
class LiveStatus:
    """The live view of one stage (`carv_attrib.store.live`): clips current, superseded rows of removed
    or changed clips; latents add statuses and pending (manifest clips without a row), features
    to_compute (live ok latents without a feature). A field None is not shown."""

    clips: int
    superseded_rows: int
    statuses: dict[str, int] | None = None
    pending: int | None = None
    to_compute: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"clips": self.clips}
        d |= {"statuses": self.statuses} if self.statuses is not None else {}
        d |= {"pending": self.pending} if self.pending is not None else {}
        d |= {"to_compute": self.to_compute} if self.to_compute is not None else {}
        return d | {"superseded_rows": self.superseded_rows}


@dataclass(frozen=True)
class StageStatus:
    """One stage: its fingerprint and creation time (STAGE/config.json), done shards, every done row's
    status (`rows` in all), the decoders that took the ok clips' frames (latents) and the live view."""

    fingerprint: str | None
    created_at: str | None
    shards_done: int
    rows: int
    statuses: dict[str, int]
    decoders: dict[str, int] | None = None
    live: LiveStatus | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
            "shards_done": self.shards_done,
            "rows": self.rows,
            "statuses": self.statuses,
        }
        d |= {"decoders": self.decoders} if self.decoders else {}
        return d | ({"live": self.live.to_dict()} if self.live is not None else {})


@dataclass(frozen=True)
class IndexStatus:
    """The index as stored (`IndexSummary`, any schema version) and whether it is `fresh` (built from
    the live set); stale_reason says why not."""

    summary: IndexSummary
    fresh: bool
    stale_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return self.summary.to_dict() | {"fresh": self.fresh, "stale_reason": self.stale_reason}


@dataclass(frozen=True)
class StatusDoc:
    """What `carv-attrib status` reports (nothing is written to disk). `to_dict` is the JSON shown by
    `--format json`, key for key; a None optional field is left out (the stages and index show null)."""

    run: str
    latents: StageStatus | None
    features: StageStatus | None
    index: IndexStatus | None
    manifest_clips: int | None = None
    layout_error: str | None = None  # a run of an older layout: shown, not fatal
    invocations: int | None = None  # entries of run.json, None without one
    last_command: str | None = None
    writer: str | None = None  # the command holding RUN/.lock now (`store.lock`), None when none
    index_note: str | None = None  # what status found of an interrupted index swap or dead builds

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"run": self.run}
        d |= {"manifest_clips": self.manifest_clips} if self.manifest_clips is not None else {}
        d |= {
            s: (v.to_dict() if v is not None else None)
            for s, v in (("latents", self.latents), ("features", self.features))
        }
        d |= {"layout_error": self.layout_error} if self.layout_error is not None else {}
        d["index"] = self.index.to_dict() if self.index is not None else None
        if self.invocations is not None:
            d |= {"invocations": self.invocations, "last_command": self.last_command}
        d |= {"writer": self.writer} if self.writer is not None else {}
        d |= {"index_note": self.index_note} if self.index_note is not None else {}
        return d


def stage_status(store: ShardStore) -> dict[str, Any] | None:
    """Fingerprint, done shards and row statuses of one stage (None when it was never started)."""
    st = read_stage_status(store)
    return st.to_dict() if st is not None else None


def read_stage_status(store: ShardStore, live: LiveStatus | None = None) -> StageStatus | None:
    """`stage_status` as a record, with the stage's live view (computed by `status_doc`)."""
    rec = store.read_record(StageRecord)
    if rec is None:
        return None
    done = store.done_shards()
    statuses: Counter[str] = Counter()
    decoders: Counter[str] = Counter()  # latents: which decoder took each ok clip's frames
    for i in done:
        names = pq.read_schema(store.shard_path(i)).names
        t = pq.read_table(store.shard_path(i), columns=[c for c in ("status", "decoder") if c in names])
        statuses.update(t.column("status").to_pylist())
        if "decoder" in names:
            decoders.update(d for d in t.column("decoder").to_pylist() if d is not None)
    return StageStatus(
        fingerprint=rec.fingerprint,
        created_at=rec.created_at,
        shards_done=len(done),
        rows=sum(statuses.values()),
        statuses=dict(statuses),
        decoders=dict(decoders) or None,
        live=live,
    )


def status_doc(run: Path | str | RunDir) -> StatusDoc:
    """What RUN holds; UsageError (exit 2) when RUN is not a directory.

    Per stage: every done row (`rows`, `statuses`) and the live view (`carv_attrib.store.live`): the
    current clips, what is still to compute and the superseded rows of removed or changed clips. The
    index says whether it is `fresh` (built from the live set) and, when not, why. Status takes no
    lock: `writer` names a command writing RUN now, and `index_note` what it found of an interrupted
    index swap (restoring the previous index when no writer is live).
    """
    run = RunDir(run)
    if not run.root.is_dir():
        raise UsageError(f"{run} is not a run directory")
    manifest = pq.read_metadata(run.manifest_table).num_rows if run.manifest_table.exists() else None
    lat_live = feat_live = layout_error = None
    started = {s.stage: s.config_path.exists() for s in (run.latents, run.features)}
    try:
        live = run.live_latents()
        if started["latents"]:
            lat_live = LiveStatus(
                clips=len(live),
                statuses=live.statuses(),
                pending=len(live.pending),
                superseded_rows=live.rows_total - len(live),
            )
        if started["features"]:
            feats = run.live_features(live)
            feat_live = LiveStatus(
                clips=len(feats.rows),
                to_compute=len(feats.missing),
                superseded_rows=feats.rows_total - len(feats.rows),
            )
    except ConfigMismatchError as exc:  # a run of an older layout: shown, not fatal
        layout_error = str(exc)
    index_note = _index_leftovers(run)
    index = None
    if run.index_info_path.exists():
        summary = IndexSummary.read(run.index_info_path)
        try:
            run.index_info(check_fresh=True)
            index = IndexStatus(summary, fresh=True, stale_reason=None)
        except UsageError as exc:
            index = IndexStatus(summary, fresh=False, stale_reason=str(exc))
    log = RunLog.read(run.run_log) if run.run_log.exists() else None
    return StatusDoc(
        run=str(run),
        manifest_clips=manifest,
        latents=read_stage_status(run.latents, lat_live),
        features=read_stage_status(run.features, feat_live),
        layout_error=layout_error,
        index=index,
        invocations=len(log.invocations) if log is not None else None,
        last_command=log.last_command if log is not None else None,
        writer=(holder(run.root) or "another command") if is_written(run.root) else None,
        index_note=index_note,
    )


def _index_leftovers(run: RunDir) -> str | None:
    """Repair an interrupted index swap (`RunDir.recover_index`, only while no writer is live) and say
    what was found: the restore, a swap in progress, or temporary directories of builds that died
    (removed by the next featurize or index, under the writer lock)."""
    note = run.recover_index()
    if note is None and run.index_swapping():
        note = "index swap in progress: a writer is replacing the index"
    tmps = run.index_tmps()
    if tmps and not is_written(run.root):
        dead = (
            f"{len(tmps)} temporary index director{'y' if len(tmps) == 1 else 'ies'} of a build that "
            "died (removed by the next `featurize` or `index`)"
        )
        note = f"{note}; {dead}" if note else dead
    return note


def run_status(run: Path | str | RunDir) -> dict[str, Any]:
    """`status_doc(run).to_dict()`: what RUN holds, as a JSON-able dict."""
    return status_doc(run).to_dict()
