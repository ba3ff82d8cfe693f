from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from carv_attrib.errors import ConfigMismatchError
from carv_attrib.store.shards import METADATA_KEY, ShardStore, atomic_path, fingerprint


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_shard_roundtrip_done_markers_and_provenance(tmp_path: Path) -> None:
    store = ShardStore(tmp_path, "latents")
    fp = store.prepare({"a": 1})
    assert fp == fingerprint({"a": 1})
    t = pa.table({"clip_id": pa.array([1, 2], pa.int64()), "status": ["ok", "missing"]})
    store.write_shard(3, t, {"n": 2}, {"fingerprint": fp})
    # A shard without its done marker is not done and is not read.
    store.shard_path(4).write_bytes(b"garbage")
    assert store.done_shards() == [3]
    assert store.read_table().num_rows == 2
    assert store.read_provenance() == {"fingerprint": fp}
    import pyarrow.parquet as pq

    assert json.loads(pq.read_schema(store.shard_path(3)).metadata[METADATA_KEY])["fingerprint"] == fp


def test_prepare_refuses_another_config_and_names_the_difference(tmp_path: Path) -> None:
    store = ShardStore(tmp_path, "latents")
    store.prepare({"frames": 17, "model": {"fp": "abc"}})
    store.prepare({"frames": 17, "model": {"fp": "abc"}})  # same config: resume
    with pytest.raises(ConfigMismatchError, match=r"frames: 17 -> 33.*--overwrite"):
        store.prepare({"frames": 33, "model": {"fp": "abc"}})
    store.write_shard(0, pa.table({"x": [1]}), {}, {})
    store.prepare({"frames": 33, "model": {"fp": "abc"}}, overwrite=True)
    assert store.done_shards() == []
    assert store.read_config()["config"]["frames"] == 33


def test_stale_temp_files_are_removed_on_resume_and_live_writers_kept(tmp_path: Path) -> None:
    """A dead writer's temp file goes; a running writer's (another part) and another host's stay."""
    import subprocess

    from carv_attrib.store.shards import _HOST

    store = ShardStore(tmp_path, "latents")
    store.prepare({"a": 1})
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    dead = store.dir / f".part-00000.parquet.{_HOST}.{gone.pid}.tmp"
    live = store.dir / f".part-00001.parquet.{_HOST}.{os.getpid()}.tmp"
    other = store.dir / ".part-00002.parquet.another-host.1.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    store.prepare({"a": 1})
    assert not dead.exists() and live.exists() and other.exists()


def test_model_source_is_provenance_not_identity(tmp_path: Path) -> None:
    """Naming the same model by another path resumes; the stage keeps its original fingerprint."""
    store = ShardStore(tmp_path, "latents")
    cfg = {
        "model": {"source": "models/tiny", "components": {"vae": {"files": {"w": "h1"}}}},
        "layers": ("a",),
    }
    fp = store.prepare(cfg)
    moved = {**cfg, "model": {**cfg["model"], "source": "/abs/models/tiny"}}
    assert fingerprint(moved) == fp
    assert store.prepare(moved) == fp  # tuples vs stored JSON lists are the same config too
    assert store.read_config()["config"]["model"]["source"] == "models/tiny"
    legacy = json.loads(store.config_path.read_text()) | {"fingerprint": "made-by-an-older-rule"}
    store.config_path.write_text(json.dumps(legacy))
    assert store.prepare(cfg) == "made-by-an-older-rule"  # the fingerprint shards already carry
    numbers = ShardStore(tmp_path, "features")
    numbers.prepare({"n": 1, "x": float("nan")})
    numbers.prepare({"n": 1, "x": float("nan")})  # NaN settings still resume
    with pytest.raises(ConfigMismatchError):
        numbers.prepare({"n": True, "x": float("nan")})  # 1 and true are stored differently
    other = {**cfg, "model": {"source": "models/tiny", "components": {"vae": {"files": {"w": "h2"}}}}}
    with pytest.raises(ConfigMismatchError, match=r"model.components.vae.files.w: 'h1' -> 'h2'"):
        store.prepare(other)


def test_concurrent_appends_to_run_json_keep_every_entry(tmp_path: Path) -> None:
    """A reader (score) records beside a writer: the read-modify-write of run.json runs under its own
    flock (each thread opens its own descriptor, so they exclude each other as processes do)."""
    import threading

    from carv_attrib.store.shards import record_invocation

    def append(who: str) -> None:
        for i in range(20):
            record_invocation(tmp_path, {"command": who, "i": i})

    threads = [threading.Thread(target=append, args=(w,)) for w in ("score", "featurize")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = json.loads((tmp_path / "run.json").read_text())["invocations"]
    assert sorted((e["command"], e["i"]) for e in got) == sorted(
        (w, i) for w in ("score", "featurize") for i in range(20)
    )
