"""`--shard I/N` and `--executor ray` (`carv_attrib.pipeline.ray_exec`): parts run by hand, by Ray on a
local 2-CPU cluster, and by Ray with a worker that dies mid-part, all hold the same rows as one local
run: latents and features bitwise (batch 1 on every side), and the same index."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.ray_exec import DIE_ONCE_ENV
from carv_attrib.store.run import RunDir
from tests.pipeline.worlds import World, assert_same_run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (starting one costs seconds); workers inherit the test env."""
    os.environ[DIE_ONCE_ENV] = ""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def latents_by_clip(run: Path) -> dict[int, tuple[bytes, bytes]]:
    r = RunDir(run)
    out = {}
    for cid, _, row in r.live_latents().ok():
        shard, i = row.where
        t = pq.read_table(r.latents.shard_path(shard), columns=["latent", "text_emb"]).slice(i, 1)
        out[cid] = (t.column("latent")[0].as_py(), t.column("text_emb")[0].as_py())
    return out


def assert_same_rows(run: Path, reference: Path) -> None:
    assert latents_by_clip(run) == latents_by_clip(reference)
    assert_same_run(run, reference)


def test_parts_by_hand_then_a_plain_run_commit(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carv_attrib.store import sources

    reference, parts = tmp_path / "local", tmp_path / "parts"
    world.all_stages(reference)
    for i in range(3):
        s = world.encode(parts, shard=f"{i}/3")
        assert s.total == 0, "a part commits nothing"
    with pytest.raises(UsageError, match="without --shard to commit them"):
        world.featurize(parts)  # uncommitted parts: refused, not an empty run
    hashed = []
    real = sources.file_sha256
    monkeypatch.setattr(sources, "file_sha256", lambda p: hashed.append(p) or real(p))
    done = world.encode(parts)
    assert hashed == [], "the commit pass takes the parts' recorded hashes"
    monkeypatch.undo()
    assert done.encoded == 0 and done.changes["resumed"] == len(world.rows)
    for i in range(3):
        world.featurize(parts, shard=f"{i}/3")
    assert world.featurize(parts).computed == 0
    world.index(parts)
    assert_same_rows(parts, reference)


def test_bad_distribution_options_are_refused_before_work(world: World, tmp_path: Path) -> None:
    for kw, msg in (
        ({"shard": "2/2"}, "I must be in 0..N-1"),
        ({"shard": "x"}, "give I/N"),
        ({"executor": "spark"}, "--executor spark"),
        ({"executor": "ray", "shard": "0/2"}, "--executor ray makes its own parts"),
        ({"shard": "0/2", "overwrite": True}, "each part discard the others' work"),
        ({"executor": "ray", "ray_address": "127.0.0.1:9"}, "no Ray cluster answers there"),
    ):
        with pytest.raises(UsageError, match=msg):
            world.encode(tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()


def test_ray_runs_killed_or_not_hold_the_local_rows(world: World, tmp_path: Path, ray_cluster) -> None:
    reference = tmp_path / "local"
    world.all_stages(reference)

    by_ray = tmp_path / "ray"
    world.encode(by_ray, executor="ray", parts=2)
    world.featurize(by_ray, executor="ray", parts=2)
    world.index(by_ray)
    assert_same_rows(by_ray, reference)

    # A run interrupted after part 0 of 2, resumed by Ray; and a worker that dies after its first shard.
    resumed = tmp_path / "resumed"
    world.encode(resumed, shard="0/2")
    marker = tmp_path / "died"
    os.environ[DIE_ONCE_ENV] = str(marker)  # read by the workers when a task starts
    try:
        world.encode(resumed, executor="ray", parts=2)
        world.featurize(resumed, executor="ray", parts=2)
    finally:
        os.environ[DIE_ONCE_ENV] = ""
    assert marker.exists(), "a worker died and Ray retried its part"
    world.index(resumed)
    assert_same_rows(resumed, reference)
    rows = sum(s["clips"] for s in RunDir(resumed).latents.read_stats())
    assert rows == len(world.rows), "no clip encoded twice"
