"""store/run.py: RunDir's paths and checks, the typed IndexInfo record (round trip, schema version,
staleness against the run's latents/features fingerprints) and the atomic index swap."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.store.digests import doc_digest
from carv_attrib.store.live import LiveLatents
from carv_attrib.store.manifest import ClipTable
from carv_attrib.store.run import INDEX_SCHEMA_VERSION, EncodeFacts, IndexInfo, RunDir
from carv_attrib.store.shards import ShardStore
from carv_attrib.store.sources import SourcedClips, SourceId


def make_info(latents_fp: str = "a" * 16, features_fp: str = "b" * 16) -> IndexInfo:
    """An IndexInfo with a value in every field (nested dicts, lists, None entries)."""
    return IndexInfo(
        fingerprint=features_fp,
        latents_fingerprint=latents_fp,
        count=8,
        dim=1280,
        blocks=[640, 640],
        factory="Flat",
        preconditioner={"kind": "cosine", "blocks": [640, 640]},
        lambda_rel=0.01,
        draws={"rule": "v1", "seed": 0, "scheme": "stratified-is", "draws": 4, "density": "uniform"},
        output_fn="loss",
        timestep="t = 1000*sigma (float)",
        projector={"kind": "kron", "seed": 0, "layers": [{"name": "blocks.0.attn1.to_q", "k_out": 8}]},
        feature_dtype="float32",
        transformers=["c" * 16, "d" * 16],
        checkpoints=["models/m:transformer", "/abs/ck.safetensors"],
        checkpoint_paths=[None, "/abs/ck.safetensors"],
        model_source="/abs/models/m",
        live_digest=LiveLatents().digest(),  # an empty run's
        encode=EncodeFacts(
            frames=9,
            height=32,
            width=32,
            fps=8.0,
            pad_short=False,
            dtype="float32",
            latent_dtype="float16",
            model_fingerprint="e" * 16,
            components={"vae": {"files": {"config.json": "f" * 64}}},
        ),
        created_at="2026-01-01T00:00:00+0000",
        tool_version="0.0.0",
        extra={"note": "x"},
    )


def stage_run(root: Path, latents: dict | None = None, features: dict | None = None) -> tuple[str, str]:
    """A run whose latents/ and features/ hold only a config.json (ShardStore.prepare); their fingerprints."""
    lat = ShardStore(root, "latents").prepare(latents or {"frames": 9, "size": "32x32"})
    feat = ShardStore(root, "features").prepare(features or {"draws": 4, "latents": lat})
    return lat, feat


# -- paths ---------------------------------------------------------------------------------------
def test_paths(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    root = tmp_path / "r"
    assert run.root == root
    assert run.manifest_table == root / "manifest" / "clips.parquet"
    assert run.run_log == root / "run.json"
    assert run.index_dir == root / "index"
    assert run.faiss_path == root / "index" / "index.faiss"
    assert run.preconditioner_dir == root / "index" / "preconditioner"
    assert run.index_info_path == root / "index" / "index_info.json"
    assert run.latents.dir == root / "latents" and run.latents.stage == "latents"
    assert run.features.dir == root / "features" and run.features.stage == "features"
    assert str(run) == str(root) and repr(run) == f"RunDir({str(root)!r})"
    assert not root.exists(), "creating a RunDir touches nothing on disk"


def test_rundir_of_a_rundir_and_of_a_str(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    again = RunDir(run)
    assert again.root == run.root and again.index_info_path == run.index_info_path
    assert RunDir(str(tmp_path)).root == tmp_path


# -- checks --------------------------------------------------------------------------------------
def test_require_latents_on_an_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no latent cache; run `carv-attrib encode") as exc:
        RunDir(tmp_path).require_latents()
    assert exc.value.exit_code == 2 and str(tmp_path) in str(exc.value)


def test_require_latents_needs_a_finished_shard(tmp_path: Path) -> None:
    """A config.json alone (encode killed before its first shard) is not a latent cache."""
    ShardStore(tmp_path, "latents").prepare({"frames": 9})
    with pytest.raises(UsageError, match="no latent cache"):
        RunDir(tmp_path).require_latents()


def test_require_latents_of_an_encoded_run(encoded_run: Path) -> None:
    cfg = RunDir(encoded_run).require_latents()
    assert cfg == ShardStore(encoded_run, "latents").read_config()
    assert cfg["config"]["frames"] == 9


def test_require_features_on_an_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no features; run `carv-attrib featurize") as exc:
        RunDir(tmp_path).require_features()
    assert exc.value.exit_code == 2


def test_require_features_returns_the_config(tmp_path: Path) -> None:
    _, feat = stage_run(tmp_path)
    assert RunDir(tmp_path).require_features()["fingerprint"] == feat


# -- IndexInfo -----------------------------------------------------------------------------------
def test_index_info_round_trip(tmp_path: Path) -> None:
    info = make_info()
    path = tmp_path / "index" / "index_info.json"
    info.write(path)
    back = IndexInfo.read(path)
    assert back == info
    assert isinstance(back.encode, EncodeFacts)
    assert back.schema_version == INDEX_SCHEMA_VERSION
    stored = json.loads(path.read_text())
    assert stored.pop("digest") == doc_digest(stored)  # the document's own checksum
    assert stored == dataclasses.asdict(info)


def test_index_info_of_a_featurized_run_round_trips(featurized_run: Path, tmp_path: Path) -> None:
    info = RunDir(featurized_run).index_info()
    info.write(tmp_path / "i.json")
    assert IndexInfo.read(tmp_path / "i.json") == info


@pytest.mark.parametrize("version", [2, INDEX_SCHEMA_VERSION + 1, None])
def test_another_schema_version_is_refused(tmp_path: Path, version: int | None) -> None:
    run = RunDir(tmp_path / "run")
    d = make_info().to_dict()
    if version is None:
        del d["schema_version"]
    else:
        d["schema_version"] = version
    run.index_dir.mkdir(parents=True)
    run.index_info_path.write_text(json.dumps(d))
    with pytest.raises(ConfigMismatchError, match=r"`carv-attrib index ") as exc:
        IndexInfo.read(run.index_info_path)
    assert f"`carv-attrib index {run.root}`" in str(exc.value)
    assert exc.value.exit_code == 2
    with pytest.raises(ConfigMismatchError, match="carv-attrib index"):
        run.index_info(check_fresh=False)


def test_index_info_without_an_index(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"has no index; run `carv-attrib featurize`"):
        RunDir(tmp_path).index_info()


def test_index_info_of_a_fresh_index(tmp_path: Path) -> None:
    lat, feat = stage_run(tmp_path)
    run = RunDir(tmp_path)
    make_info(lat, feat).write(run.index_info_path)
    assert run.index_info() == make_info(lat, feat)


@pytest.mark.parametrize("stage", ["latents", "features"])
def test_index_info_refuses_a_stale_index(tmp_path: Path, stage: str) -> None:
    lat, feat = stage_run(tmp_path)
    run = RunDir(tmp_path)
    make_info(lat, feat).write(run.index_info_path)
    # The stage is remade with another configuration (--overwrite): a new fingerprint.
    old = lat if stage == "latents" else feat
    new = ShardStore(tmp_path, stage).prepare({"something": "else"}, overwrite=True)
    assert new != old
    with pytest.raises(ConfigMismatchError) as exc:
        run.index_info()
    msg = str(exc.value)
    assert f"built from {stage} {old}" in msg and f"now holds {new}" in msg
    assert "carv-attrib featurize" in msg and "carv-attrib index" in msg
    # Without the check the record is still readable (status shows it).
    assert run.index_info(check_fresh=False).fingerprint == feat


@pytest.mark.parametrize("stage", ["latents", "features"])
def test_index_info_refuses_a_deleted_stage(tmp_path: Path, stage: str) -> None:
    lat, feat = stage_run(tmp_path)
    run = RunDir(tmp_path)
    make_info(lat, feat).write(run.index_info_path)
    shutil.rmtree(tmp_path / stage)
    with pytest.raises(ConfigMismatchError, match="now holds None"):
        run.index_info()


# -- index_swap ----------------------------------------------------------------------------------
def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def _old_index(run: RunDir) -> dict[str, str]:
    (run.index_dir / "preconditioner").mkdir(parents=True)
    run.faiss_path.write_text("old faiss")
    (run.preconditioner_dir / "state.json").write_text("old state")
    return _tree(run.index_dir)


def test_index_swap_failure_leaves_the_previous_index(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    before = _old_index(run)
    with pytest.raises(RuntimeError, match="boom"):
        with run.index_swap() as tmp:
            assert tmp != run.index_dir and tmp.is_dir() and not any(tmp.iterdir())
            (tmp / "index.faiss").write_text("half written")
            raise RuntimeError("boom")
    assert _tree(run.index_dir) == before


def test_index_swap_success_replaces_the_index(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    _old_index(run)
    with run.index_swap() as tmp:
        (tmp / "index.faiss").write_text("new faiss")
        (tmp / "index_info.json").write_text("{}")
    assert _tree(run.index_dir) == {"index.faiss": "new faiss", "index_info.json": "{}"}
    # Nothing of the swap is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_index_swap_without_a_previous_index(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with run.index_swap() as tmp:
        (tmp / "index.faiss").write_text("first")
    assert _tree(run.index_dir) == {"index.faiss": "first"}


def test_index_swap_clears_a_temporary_dir_left_by_a_failed_build(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    before = _old_index(run)
    with pytest.raises(RuntimeError):
        with run.index_swap() as tmp:
            (tmp / "stale").write_text("x")
            raise RuntimeError
    assert _tree(run.index_dir) == before
    with run.index_swap() as tmp:
        assert not any(tmp.iterdir()), "the next build starts from an empty directory"
        (tmp / "index.faiss").write_text("new")
    assert _tree(run.index_dir) == {"index.faiss": "new"}


def test_index_swap_after_a_swap_killed_before_cleanup(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    _old_index(run)
    (tmp_path / ".index.old").mkdir()
    (tmp_path / ".index.old" / "index.faiss").write_text("older")
    with run.index_swap() as tmp:
        (tmp / "index.faiss").write_text("new")
    assert _tree(run.index_dir) == {"index.faiss": "new"}


def test_a_kill_between_the_two_renames_restores_the_previous_index(tmp_path: Path) -> None:
    """RUN/index renamed to .index.old, the new one not yet in place: the old index comes back."""
    run = RunDir(tmp_path)
    (tmp_path / ".index.old").mkdir()
    (tmp_path / ".index.old" / "index.faiss").write_text("old")
    run.recover_index()
    assert (run.index_dir / "index.faiss").read_text() == "old" and not (tmp_path / ".index.old").exists()


def test_an_index_is_stale_when_the_live_set_of_clips_changed(tmp_path: Path) -> None:
    """A clip that became live after the index was built (an encode committed it) makes it stale."""
    run = RunDir(tmp_path)
    fp_lat = run.latents.prepare({"a": 1})
    fp_feat = run.features.prepare({"b": 1})
    info = make_info(latents_fp=fp_lat, features_fp=fp_feat)
    run.index_dir.mkdir()
    info.write(run.index_info_path)
    assert run.index_info().count == info.count  # nothing live yet: the empty set it was built from
    row = {"clip_id": 7, "source_key": "k7", "status": "ok", "latent_sha": "abc"}
    run.latents.write_shard(0, pa.Table.from_pylist([row]), {"shard": 0, "clips": 1}, {})
    clips = ClipTable([7], ["v7"], ["c"], ["/v7.mp4"])
    SourcedClips(clips, [SourceId(None, None, None)], ["k7"]).write(run.manifest_table)
    with pytest.raises(ConfigMismatchError, match="another set of clips"):
        run.index_info()


def test_each_build_has_its_own_temporary_dir_and_leftovers_are_removed(tmp_path: Path) -> None:
    """Two builds never share a fixed `.index.tmp`; a dead writer's temporary dirs (the fixed name
    of older versions too) are removed by the next writer; a failed block removes its own."""
    run = RunDir(tmp_path)
    (tmp_path / ".index.tmp").mkdir()
    (tmp_path / ".index.tmp-1-dead").mkdir()
    with run.index_swap() as a:
        assert run.index_tmps() == [a] and a.name.startswith(f".index.tmp-{os.getpid()}-")
        (a / "index.faiss").write_text("a")
    with pytest.raises(RuntimeError), run.index_swap() as b:
        assert b != a
        raise RuntimeError
    assert run.index_tmps() == [] and _tree(run.index_dir) == {"index.faiss": "a"}


def test_a_swap_interrupted_after_its_first_rename_is_restored_by_a_reader(tmp_path: Path) -> None:
    """The first rename done by hand (RUN/index -> .index.old, the new one still a tmp): the next
    reader restores the previous index and says so."""
    run = RunDir(tmp_path)
    before = _old_index(run)
    run.index_dir.rename(run.index_old)
    (tmp_path / ".index.tmp-1-dead").mkdir()
    assert run.recover_index() == "index swap interrupted: restored the previous index"
    assert _tree(run.index_dir) == before and not run.index_old.exists()
    assert run.recover_index() is None  # nothing left to do


def test_a_schema_3_index_still_reads(tmp_path: Path) -> None:
    """Schema 4 only added fields (sketch, trak forms) that a schema-3 index does not use."""
    d = make_info().to_dict() | {"schema_version": 3}
    d.pop("sketch", None)
    (tmp_path / "i.json").write_text(json.dumps(d))
    back = IndexInfo.read(tmp_path / "i.json")
    assert back.schema_version == 3 and back.sketch is None
