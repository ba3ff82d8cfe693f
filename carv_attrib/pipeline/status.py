"""What a run directory holds: stages, shards, clip statuses, fingerprints (`carv-attrib status`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from carv_attrib.data.run import RunDir
from carv_attrib.data.store import ShardStore, read_json
from carv_attrib.errors import ConfigMismatchError, UsageError


def stage_status(store: ShardStore) -> dict[str, Any] | None:
    """Fingerprint, done shards and row statuses of one stage (None when it was never started)."""
    cfg = store.read_config()
    if cfg is None:
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
    out = {
        "fingerprint": cfg.get("fingerprint"),
        "created_at": cfg.get("created_at"),
        "shards_done": len(done),
        "rows": sum(statuses.values()),
        "statuses": dict(statuses),
    }
    if decoders:
        out["decoders"] = dict(decoders)
    return out


def run_status(run: Path | str | RunDir) -> dict[str, Any]:
    """What RUN holds (a JSON-able dict); UsageError (exit 2) when RUN is not a directory.

    Per stage: every done row (`rows`, `statuses`) and the live view (`carv_attrib.data.live`): the
    current clips, what is still to compute and the superseded rows of removed or changed clips. The
    index says whether it is `fresh` (built from the live set) and, when not, why.
    """
    run = RunDir(run)
    if not run.root.is_dir():
        raise UsageError(f"{run} is not a run directory")
    out: dict[str, Any] = {"run": str(run)}
    if run.manifest_table.exists():
        out["manifest_clips"] = pq.read_metadata(run.manifest_table).num_rows
    for stage in (run.latents, run.features):
        out[stage.stage] = stage_status(stage)
    try:
        live = run.live_latents()
        if out["latents"] is not None:
            out["latents"]["live"] = {
                "clips": len(live),
                "statuses": live.statuses(),
                "pending": len(live.pending),
                "superseded_rows": live.rows_total - len(live),
            }
        if out["features"] is not None:
            feats = run.live_features(live)
            out["features"]["live"] = {
                "clips": len(feats.rows),
                "to_compute": len(feats.missing),
                "superseded_rows": feats.rows_total - len(feats.rows),
            }
    except ConfigMismatchError as exc:  # a run of an older layout: shown, not fatal
        out["layout_error"] = str(exc)
    out["index"] = read_json(run.index_info_path) if run.index_info_path.exists() else None
    if out["index"] is not None:
        try:
            run.index_info(check_fresh=True)
            out["index"]["fresh"], out["index"]["stale_reason"] = True, None
        except UsageError as exc:
            out["index"]["fresh"], out["index"]["stale_reason"] = False, str(exc)
    runinfo = run.run_log
    if runinfo.exists():
        inv = read_json(runinfo).get("invocations", [])
        out["invocations"] = len(inv)
        out["last_command"] = inv[-1].get("command") if inv else None
    return out
