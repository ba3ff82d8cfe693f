"""pipeline/status.py `run_status`: what a run directory holds, from tiny stores built with
ShardStore directly (no model, no encode)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carv_attrib.errors import CarvError, UsageError
from carv_attrib.pipeline.status import run_status
from carv_attrib.store.shards import ShardStore, fingerprint, record_invocation, write_json_atomic

STAGES = ("latents", "features")


def _shard(store: ShardStore, index: int, statuses: list[str], done: bool = True) -> None:
    table = pa.table(
        {"clip_id": pa.array(range(index * 100, index * 100 + len(statuses)), pa.int64()), "status": statuses}
    )
    store.write_shard(index, table, {"shard": index, "clips": len(statuses)}, {"stage": store.stage})
    if not done:
        store.done_path(index).unlink()  # interrupted before its done marker


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_not_a_directory_is_a_usage_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run"
    if kind == "file":
        path.write_text("not a run")
    with pytest.raises(UsageError, match="is not a run directory") as info:
        run_status(path)
    assert isinstance(info.value, CarvError) and info.value.exit_code == 2
    assert str(path) in str(info.value)


def test_empty_directory_reports_no_stages(tmp_path: Path) -> None:
    info = run_status(tmp_path)
    assert info["run"] == str(tmp_path)
    assert {stage: info[stage] for stage in STAGES} == {"latents": None, "features": None}
    assert info["index"] is None
    assert "manifest_clips" not in info and "invocations" not in info and "last_command" not in info
    assert json.loads(json.dumps(info)) == info  # `status --format json` prints it as is


def test_stages_report_fingerprints_shards_and_status_counts(tmp_path: Path) -> None:
    latents = ShardStore(tmp_path, "latents")
    fp_lat = latents.prepare({"frames": 9, "size": [32, 32]})
    _shard(latents, 0, ["ok", "ok", "missing"])
    _shard(latents, 1, ["decode_error", "ok", "timeout"])
    _shard(latents, 2, ["ok", "ok"])
    _shard(latents, 3, ["ok", "crash", "crash"], done=False)  # not done: not counted

    features = ShardStore(tmp_path, "features")
    fp_feat = features.prepare({"draws": 4, "latents": fp_lat})
    _shard(features, 0, ["ok", "ok", "nonfinite"])

    info = run_status(tmp_path)
    assert fp_lat != fp_feat
    lat = info["latents"]
    assert lat["fingerprint"] == fp_lat == fingerprint({"frames": 9, "size": [32, 32]})
    assert lat["created_at"] == latents.read_config()["created_at"]
    assert lat["shards_done"] == 3
    assert lat["rows"] == 8
    assert lat["statuses"] == {"ok": 5, "missing": 1, "decode_error": 1, "timeout": 1}
    feat = info["features"]
    assert (feat["fingerprint"], feat["shards_done"], feat["rows"]) == (fp_feat, 1, 3)
    assert feat["statuses"] == {"ok": 2, "nonfinite": 1}
    assert json.loads(json.dumps(info)) == info


def test_stage_with_config_but_no_shards(tmp_path: Path) -> None:
    fp = ShardStore(tmp_path, "latents").prepare({"a": 1})
    info = run_status(tmp_path)
    assert info["latents"] == {
        "fingerprint": fp,
        "created_at": ShardStore(tmp_path, "latents").read_config()["created_at"],
        "shards_done": 0,
        "rows": 0,
        "statuses": {},
        "live": {"clips": 0, "statuses": {}, "pending": 0, "superseded_rows": 0},
    }
    assert info["features"] is None


def test_manifest_index_and_invocations(tmp_path: Path) -> None:
    (tmp_path / "manifest").mkdir()
    pq.write_table(
        pa.table({"clip_id": pa.array([1, 2, 3, 4], pa.int64())}), tmp_path / "manifest" / "clips.parquet"
    )
    index_info = {"fingerprint": "abc123", "count": 4, "dim": 16, "preconditioner": {"kind": "cosine"}}
    write_json_atomic(tmp_path / "index" / "index_info.json", index_info)
    record_invocation(tmp_path, {"command": "encode", "argv": ["carv-attrib", "encode"]})
    record_invocation(tmp_path, {"command": "featurize", "argv": ["carv-attrib", "featurize"]})

    info = run_status(tmp_path)
    assert info["manifest_clips"] == 4
    assert {k: info["index"][k] for k in index_info} == index_info
    assert info["index"]["fresh"] is False and "schema" in info["index"]["stale_reason"]
    assert info["invocations"] == 2 and info["last_command"] == "featurize"


def test_run_json_without_invocations(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"invocations": []}))
    info = run_status(tmp_path)
    assert info["invocations"] == 0 and info["last_command"] is None
