"""Runs that grow and heal: encode / featurize / index after manifest edits, file edits, kills and
reruns hold exactly what a from-scratch run on the final state holds (`carv_attrib.store.live`).

Replays the sequences that gave stale results with exit 0 (issue 13), then random sequences of
edits and interrupted stages compared with a from-scratch run. Both sides use batch 1 (VAE calls,
backward passes), so each clip's numbers come from the same computation and are compared bitwise.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.index import index_config_keeping
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.store.run import RunDir
from tests.pipeline.worlds import World, assert_same_run, tree


# -- the sequences of issue 13 ---------------------------------------------------------------------
def test_a_restored_missing_video_reaches_the_index(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    gone = world.pool[1]
    hidden = world.root / "hidden.mp4"
    (world.videos / f"{gone}.mp4").rename(hidden)
    world.all_stages(run)
    assert RunDir(run).index_info().count == len(world.rows) - 1
    hidden.rename(world.videos / f"{gone}.mp4")  # the file is back: no flag needed to find it

    s = world.encode(run)
    assert s.encoded == 1 and s.changes["changed"] == 1 and s.failed == 0
    with pytest.raises(UsageError, match="another set of clips"):
        RunDir(run).index_info()  # stale until featurized: never served
    f = world.featurize(run)
    assert f.computed == 1 and f.changes["changed"] == 0 and f.changes["new"] == 1
    world.index(run)

    scratch = tmp_path / "scratch"
    world.all_stages(scratch)
    assert_same_run(run, scratch)


def test_a_video_changed_in_place_gets_fresh_features_and_finds_itself(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    world.all_stages(run)
    a, b = world.pool[0], world.pool[5]
    shutil.copyfile(world.videos / f"{b}.mp4", world.videos / f"{a}.mp4")  # re-cut: new content
    assert world.encode(run).changes == {
        "added": 0, "changed": 1, "removed": 0, "unchanged": len(world.rows) - 1,
        "retried": 0, "resumed": 0, "to_encode": 1,
    }  # fmt: skip
    assert world.featurize(run).computed == 1
    world.index(run)
    scratch = tmp_path / "scratch"
    world.all_stages(scratch)
    assert_same_run(run, scratch)

    # An exact copy is guaranteed to rank first only under cosine (self-similarity 1); the default
    # normalize keeps part of each clip's gradient norm, so the copy's own features are checked there
    world.index(run, precondition="cosine")
    caption = next(r["caption"] for r in world.rows if r["vid"] == a)
    out = run_score(
        ScoreConfig(
            run=run, queries=[world.videos / f"{a}.mp4"], prompt=caption, top_k=2, workers=0, device="cpu"
        )
    )
    top = out["queries"][0]["results"]
    assert {top[0]["vid"], top[1]["vid"]} == {a, b}  # the new content ranks first, beside its twin b


def test_the_manifest_grows_shrinks_and_edits_a_caption(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    removed = world.rows.pop()
    world.write()
    world.all_stages(run)
    world.rows.append(removed)  # one clip added
    del world.rows[0]  # one removed
    world.rows[1] = world.rows[1] | {"caption": world.rows[1]["caption"] + ", slowly"}  # one edited
    world.write()
    s = world.encode(run)
    assert (s.changes["added"], s.changes["removed"], s.changes["changed"], s.encoded) == (1, 1, 1, 2)
    f = world.featurize(run)
    assert (f.changes["new"], f.changes["changed"], f.changes["removed"], f.computed) == (1, 1, 1, 2)
    world.index(run)
    scratch = tmp_path / "scratch"
    world.all_stages(scratch)
    assert_same_run(run, scratch)


def test_retry_failed_retries_recorded_failures_only_when_asked(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    world.rows.append({"vid": "never-there", "caption": "a clip whose file does not exist"})
    world.write()
    first = world.encode(run)
    assert first.failures == {"missing": 1}
    again = world.encode(run)
    assert again.encoded == 0 and again.failures == {"missing": 1}  # same key, kept as it was
    retried = world.encode(run, retry_failed=True)
    assert retried.encoded == 1 and retried.changes["retried"] == 1 and retried.failures == {"missing": 1}


def test_a_rejected_invocation_changes_nothing_on_disk(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(UsageError, match="--dtype"):
        world.encode(run, dtype="fp16")
    assert not run.exists()
    world.all_stages(run)
    before = tree(run)
    with pytest.raises(UsageError, match="--dtype"):
        world.encode(run, dtype="fp16")
    with pytest.raises(UsageError, match="frames"):
        world.encode(run, frames=13)  # another configuration: refused, not mixed in
    assert tree(run) == before
    world.encode(run, dtype="float32")  # the corrected command is not refused


def test_dry_runs_count_and_write_nothing(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    world.rows.pop()
    world.write()
    world.all_stages(run)
    world.rows.append({"vid": world.pool[-1], "caption": "back again"})
    world.write()
    before = tree(run)
    s = world.encode(run, dry_run=True)
    assert s.dry_run and s.changes["added"] == 1 and s.changes["to_encode"] == 1 and s.estimated_s > 0
    assert tree(run) == before
    world.encode(run)
    before = tree(run)
    f = world.featurize(run, dry_run=True)
    assert f.dry_run and f.changes["new"] == 1 and f.estimated_s > 0
    assert tree(run) == before


def test_featurize_refuses_an_index_it_could_not_build_before_computing(world: World, tmp_path: Path) -> None:
    from carv_attrib.pipeline.index import IndexConfig, precheck_index

    run = tmp_path / "run"
    world.encode(run)
    cfg = IndexConfig(run=run, index_factory="IVF1024,Flat")
    with pytest.raises(UsageError, match="cannot train it"):
        world.featurize(run, index_check=lambda dim, n, blocks: precheck_index(cfg, dim, n, blocks))
    assert RunDir(run).features.read_config() is None, "nothing computed or written"


def test_index_rebuilds_keep_their_choices(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    world.all_stages(run)
    world.index(run, precondition="trak")
    cfg, kept = index_config_keeping(run, {"precondition": None})
    assert cfg.precondition == "trak" and kept == {"--precondition": "trak"}


# -- random sequences --------------------------------------------------------------------------------
class Interrupted(Exception):
    """Raised from a progress callback: the stage stops as a kill between two writes would leave it."""


def _interrupt_after(n: int, event: str) -> Callable[[str, dict], None]:
    seen = {"n": 0}

    def progress(ev: str, info: dict) -> None:
        if ev == event:
            seen["n"] += 1
            if seen["n"] >= n:
                raise Interrupted

    return progress


def _random_edit(world: World, rng: random.Random, hidden: Path) -> str:
    listed = {r["vid"] for r in world.rows}
    op = rng.choice(["add", "remove", "recut", "caption", "delete", "restore"])
    if op == "add" and set(world.pool) - listed:
        vid = rng.choice(sorted(set(world.pool) - listed))
        world.rows.insert(rng.randrange(len(world.rows) + 1), {"vid": vid, "caption": f"clip {vid}"})
    elif op == "remove" and len(world.rows) > 3:
        world.rows.pop(rng.randrange(len(world.rows)))
    elif op == "recut":
        a, b = rng.sample(world.pool, 2)
        if (world.videos / f"{b}.mp4").exists() and (world.videos / f"{a}.mp4").exists():
            shutil.copyfile(world.videos / f"{b}.mp4", world.videos / f"{a}.mp4")
    elif op == "caption":
        i = rng.randrange(len(world.rows))
        world.rows[i] = world.rows[i] | {"caption": world.rows[i]["caption"] + " again"}
    elif op == "delete":
        vid = rng.choice(world.pool)
        if (world.videos / f"{vid}.mp4").exists():
            os.replace(world.videos / f"{vid}.mp4", hidden / f"{vid}.mp4")
    elif op == "restore" and list(hidden.glob("*.mp4")):
        p = rng.choice(sorted(hidden.glob("*.mp4")))
        os.replace(p, world.videos / p.name)
    world.write()
    return op


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sequences_end_where_a_from_scratch_run_does(world: World, tmp_path: Path, seed: int) -> None:
    """Random manifest and file edits, each followed by encode/featurize/index runs that may be
    interrupted between or inside shards; then the same final state from scratch."""
    rng = random.Random(seed)
    run, hidden = tmp_path / "run", tmp_path / "hidden"
    hidden.mkdir()
    world.all_stages(run)
    ops = []
    for _ in range(4):
        ops.append(_random_edit(world, rng, hidden))
        complete = True
        for stage in (world.encode, world.featurize):
            if rng.random() < 0.4:  # a kill: after a finished shard, or inside one
                try:
                    stage(run, _interrupt_after(rng.randint(1, 2), rng.choice(["shard", "clip"])))
                    continue  # it finished before the kill came
                except Interrupted:
                    ops.append(f"{stage.__name__} interrupted")
                    complete = False
                    continue
            stage(run)
        if complete:
            world.index(run)
    world.all_stages(run)  # the rerun that finishes whatever a kill left
    scratch = tmp_path / "scratch"
    world.all_stages(scratch)
    assert_same_run(run, scratch), ops
