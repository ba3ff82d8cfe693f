"""Two commands on one run: the writer lock, the index swap at each of its points, score's snapshot.

Each interleaving is pinned by a handshake or a hook at the exact point (`tests/store/lock_child.py`,
`carv_attrib.store.run._between_renames`, score's `load_index`), never by a sleep.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import carv_attrib.pipeline.score as score_mod
from carv_attrib.cli.app import app
from carv_attrib.errors import IndexChangedError, RunLockedError
from carv_attrib.pipeline.featurize import FeaturizeConfig, featurize_and_index
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, load_index_dir, run_score
from carv_attrib.pipeline.status import status_doc
from carv_attrib.store.run import RunDir
from tests.store.lock_child import Child


@pytest.fixture
def run(featurized_run: Path, tmp_path: Path) -> RunDir:
    """A writable copy of the featurized run (its index: cosine)."""
    shutil.copytree(featurized_run, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _kind(run: RunDir) -> str:
    return json.loads(run.index_info_path.read_text())["preconditioner"]["kind"]


def test_a_writer_is_refused_while_another_holds_the_run(
    run: RunDir, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = run.features.read_config()
    child = Child(tmp_path, "hold", run.root).ready()
    with pytest.raises(RunLockedError, match=f"pid {child.proc.pid} "):
        featurize_and_index(FeaturizeConfig(run=run.root, model=str(tiny_model_dir), draws=8, overwrite=True))
    r = CliRunner().invoke(app, ["index", str(run.root), "--precondition", "identity"])
    assert r.exit_code == 2 and "is being written by carv-attrib featurize" in r.output
    assert run.features.read_config() == before and _kind(run) == "cosine"  # nothing was changed
    child.go()
    r = CliRunner().invoke(app, ["index", str(run.root), "--precondition", "identity", "--wait"])
    assert r.exit_code == 0, r.output
    assert _kind(run) == "identity"


def test_a_reader_during_a_live_swap_waits_and_the_swap_finishes(run: RunDir, tmp_path: Path) -> None:
    """The reported crash: a reader between the writer's two renames "restored" the old index and
    the writer's second rename died with ENOTEMPTY. Now the reader leaves it and waits."""
    child = Child(tmp_path, "swap", run.root).ready()  # stopped between the renames
    assert run.index_old.exists() and not run.index_dir.exists()
    doc = status_doc(run.root)
    assert doc.index is None and doc.index_note == "index swap in progress: a writer is replacing the index"
    assert doc.writer is not None and "carv-attrib index" in doc.writer
    assert run.recover_index() is None and run.index_old.exists()  # not touched under a live writer
    got: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: got.update(snap=run.index_snapshot(load_index_dir)))
    reader.start()
    child.go()  # exit 0: its second rename found RUN/index free
    reader.join(60)
    info, loaded = got["snap"]
    assert info.preconditioner["kind"] == "identity" and loaded.pre.kind == "identity"
    assert not run.index_old.exists() and run.index_tmps() == []


def test_a_swap_killed_between_its_renames_is_recovered(run: RunDir, tmp_path: Path) -> None:
    Child(tmp_path, "swap", run.root).ready().kill()  # SIGKILL between the two renames
    assert not run.index_dir.exists() and run.index_old.exists() and len(run.index_tmps()) == 1
    r = CliRunner().invoke(app, ["status", str(run.root), "--format", "human"])
    assert r.exit_code == 0, r.output
    assert "index swap interrupted: restored the previous index; 1 temporary index directory" in r.output
    doc = status_doc(run.root)  # restored: only the dead build's directory is left to say
    assert doc.index is not None and doc.index.fresh and doc.writer is None
    assert doc.index_note == (
        "1 temporary index directory of a build that died (removed by the next `featurize` or `index`)"
    )
    assert _kind(run) == "cosine" and not run.index_old.exists()
    build_run_index(IndexConfig(run=run.root, precondition="trak"))
    assert _kind(run) == "trak" and run.index_tmps() == []  # the dead build's tmp is gone


def test_score_snapshot_retries_an_index_replaced_between_its_reads(
    run: RunDir, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `featurize --overwrite`/`index` between score's read of index_info.json and of the FAISS
    index: score used to search the new index under the old provenance. It now reads both again."""
    real, calls = score_mod.load_index, []

    def replaced_first(path: Path) -> Any:
        calls.append(path)
        if len(calls) == 1:  # the exact point: info read, preconditioner loaded, index not yet
            build_run_index(IndexConfig(run=run.root, precondition="identity"))
        return real(path)

    monkeypatch.setattr(score_mod, "load_index", replaced_first)
    vid = "demo-00002"
    caption = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}[vid]
    cfg = ScoreConfig(run=run.root, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=caption, top_k=3)
    doc = run_score(cfg)
    assert len(calls) == 2 and doc["index"]["preconditioner"]["kind"] == "identity"


def test_score_snapshot_refuses_an_index_that_keeps_changing(
    run: RunDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = score_mod.load_index
    kinds = iter(["identity", "trak"])

    def replaced_always(path: Path) -> Any:
        build_run_index(IndexConfig(run=run.root, precondition=next(kinds)))
        return real(path)

    monkeypatch.setattr(score_mod, "load_index", replaced_always)
    with pytest.raises(IndexChangedError, match="was rebuilt while this command was reading it"):
        run.index_snapshot(load_index_dir)


def test_a_second_encode_is_refused_before_planning(
    encoded_run: Path, demo_data: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two encodes planning at once picked the same shard names (the last committer's clips won):
    the second now stops at the lock, before it plans, with the run as it was."""
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    from tests.pipeline.worlds import tree

    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    child = Child(tmp_path, "hold", run, "shared").ready()  # an encode --shard part, say
    before = tree(run)
    cfg = EncodeConfig(
        manifest=demo_data / "manifest.json",
        videos=demo_data / "videos",
        model=str(tiny_model_dir),
        run=run,
        frames=5,  # --overwrite with other frames: used to mix 5- and 9-frame latents
        size="32x32",
        overwrite=True,
        device="cpu",
    )
    with pytest.raises(RunLockedError, match="is being written by carv-attrib featurize"):
        run_encode(cfg)
    assert tree(run) == before
    child.go()
