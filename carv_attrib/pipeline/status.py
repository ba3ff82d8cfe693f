"""What a run directory holds: stages, shards, clip statuses, fingerprints (`carv-attrib status`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from carv_attrib.data.store import ShardStore, read_json
from carv_attrib.errors import UsageError


def stage_status(run: Path, stage: str) -> dict[str, Any] | None:
    store = ShardStore(run, stage)
    cfg = store.read_config()
    if cfg is None:
        return None
    done = store.done_shards()
    statuses: Counter[str] = Counter()
    for t in store.iter_tables(columns=["status"]):
        statuses.update(t.column("status").to_pylist())
    return {
        "fingerprint": cfg.get("fingerprint"),
        "created_at": cfg.get("created_at"),
        "shards_done": len(done),
        "rows": sum(statuses.values()),
        "statuses": dict(statuses),
    }


def run_status(run: Path) -> dict[str, Any]:
    run = Path(run)
    if not run.is_dir():
        raise UsageError(f"{run} is not a run directory")
    clips = run / "manifest" / "clips.parquet"
    out: dict[str, Any] = {"run": str(run)}
    if clips.exists():
        import pyarrow.parquet as pq

        out["manifest_clips"] = pq.read_metadata(clips).num_rows
    for stage in ("latents", "features"):
        out[stage] = stage_status(run, stage)
    info = run / "index" / "index_info.json"
    out["index"] = read_json(info) if info.exists() else None
    runinfo = run / "run.json"
    if runinfo.exists():
        inv = read_json(runinfo).get("invocations", [])
        out["invocations"] = len(inv)
        out["last_command"] = inv[-1].get("command") if inv else None
    return out
