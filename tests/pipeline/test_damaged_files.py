"""Damaged run files (issue 23, item 4): each gives one line naming the file and the command that
repairs it (exit 2), never scores from wrong bytes, and the repair it names works.

Damage is generated: truncation at several lengths, bytes flipped at several offsets, a deleted file,
a hand edit. Latent and feature shards carry Parquet page CRCs; the index's files are checked
against the sha256s in index_info.json, and index_info.json against its own digest.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.errors import DamagedFileError, UsageError
from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.store.run import RunDir


@pytest.fixture
def run(featurized_run: Path, tmp_path: Path) -> RunDir:
    shutil.copytree(featurized_run, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _score(run: RunDir, demo_data: Path) -> dict:
    q = demo_data / "videos" / "demo-00001.mp4"
    return run_score(ScoreConfig(run=run.root, queries=[q], prompt="a clip", top_k=3, device="cpu"))


def _top(doc: dict) -> list[tuple[int, float]]:
    return [(r["clip_id"], r["score"]) for r in doc["queries"][0]["results"]]


def _encode_cfg(run: RunDir, demo_data: Path, model: Path) -> EncodeConfig:
    """The options `encoded_run` (tests/conftest.py) was made with."""
    return EncodeConfig(
        manifest=demo_data / "manifest.json", videos=demo_data / "videos", model=str(model), run=run.root,
        frames=9, size="32x32", fps=8, shard_size=3, workers=1, device="cpu",
    )  # fmt: skip


def _flip(path: Path, at: float, n: int = 8) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    for k in range(i, min(len(b), i + n)):
        b[k] ^= 0xFF
    path.write_bytes(bytes(b))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.97])
def test_truncated_latent_shard_names_itself_and_its_repair(
    run: RunDir, demo_data: Path, tiny_model_dir: Path, keep: float
) -> None:
    shard = run.latents.shard_path(1)
    others = {i: _sha(run.latents.shard_path(i)) for i in run.latents.done_shards() if i != 1}
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * keep)])
    with pytest.raises(DamagedFileError) as info:
        _score(run, demo_data)
    msg = str(info.value)
    assert msg.startswith(f"{shard} is damaged (") and str(run.latents.done_path(1)) in msg
    assert "carv-attrib encode" in msg and "\n" not in msg
    with pytest.raises(DamagedFileError, match="part-00001.parquet is damaged"):
        run_featurize(
            FeaturizeConfig(run=run.root, model=str(tiny_model_dir), draws=4, device="cpu", batch_clips=3)
        )
    # the repair it names: remove the shard and its marker, rerun the same encode
    shard.unlink()
    run.latents.done_path(1).unlink()
    run_encode(_encode_cfg(run, demo_data, tiny_model_dir))
    assert {i: _sha(run.latents.shard_path(i)) for i in others} == others  # the other shards are kept


@pytest.mark.parametrize("at", [0.1, 0.5, 0.9])
def test_flipped_bytes_in_a_feature_shard_are_found_by_the_page_crc(run: RunDir, at: float) -> None:
    shard = run.features.shard_path(run.features.done_shards()[0])
    _flip(shard, at)
    with pytest.raises(DamagedFileError) as info:
        build_run_index(IndexConfig(run=run.root, precondition="cosine"))
    assert str(shard) in str(info.value) and "carv-attrib featurize" in str(info.value)


@pytest.mark.parametrize("at", [0.05, 0.5, 0.95])
def test_flipped_bytes_in_the_faiss_file_are_refused_and_the_named_rebuild_works(
    run: RunDir, demo_data: Path, at: float
) -> None:
    before = _top(_score(run, demo_data))
    _flip(run.faiss_path, at)
    with pytest.raises(DamagedFileError) as info:
        _score(run, demo_data)
    msg = str(info.value)
    assert msg.startswith(f"{run.faiss_path} is damaged")
    cmd = msg.split("`")[1]
    assert cmd.startswith(f"carv-attrib index {run.root} --precondition cosine")
    r = CliRunner().invoke(app, shlex.split(cmd)[1:])
    assert r.exit_code == 0, r.output
    assert _top(_score(run, demo_data)) == before


def test_deleted_rerank_vectors_of_an_ivf_index(run: RunDir, demo_data: Path) -> None:
    build_run_index(IndexConfig(run=run.root, precondition="cosine", index_factory="IVF2,Flat"))
    (run.index_dir / "vectors.bin").unlink()
    with pytest.raises(DamagedFileError) as info:
        _score(run, demo_data)
    msg = str(info.value)
    assert msg.startswith(f"{run.index_dir / 'vectors.bin'} is missing")
    assert "--index-factory IVF2,Flat --vector-dtype float16" in msg


@pytest.mark.parametrize("edit", ["count", "preconditioner", "truncate"])
def test_hand_edited_index_info_is_refused(run: RunDir, demo_data: Path, edit: str) -> None:
    path = run.index_info_path
    d = json.loads(path.read_text())
    if edit == "count":
        d["count"] += 1
    elif edit == "preconditioner":
        d["preconditioner"]["kind"] = "identity"
    if edit == "truncate":
        path.write_text(path.read_text()[:100])
    else:
        path.write_text(json.dumps(d, indent=2))
    with pytest.raises(DamagedFileError, match=f"{path} (was changed after the index was built|is damaged)"):
        _score(run, demo_data)


def test_index_of_an_older_version_without_checksums_still_opens(run: RunDir, demo_data: Path) -> None:
    before = _top(_score(run, demo_data))
    d = json.loads(run.index_info_path.read_text())
    del d["digest"], d["files"]
    run.index_info_path.write_text(json.dumps(d, indent=2))
    assert _top(_score(run, demo_data)) == before
    (run.index_dir / "index.faiss").unlink()  # and a missing file is still named, not "rebuilt"
    with pytest.raises(DamagedFileError, match="index.faiss is missing"):
        _score(run, demo_data)


def test_deleted_manifest_is_named_and_the_named_encode_repairs_it(
    run: RunDir, demo_data: Path, tiny_model_dir: Path
) -> None:
    before = _top(_score(run, demo_data))
    shards = {i: _sha(run.latents.shard_path(i)) for i in run.latents.done_shards()}
    run.manifest_table.unlink()
    with pytest.raises(DamagedFileError, match=f"{run.manifest_table} is missing.*carv-attrib encode"):
        _score(run, demo_data)
    with pytest.raises(UsageError, match="no committed manifest"):  # featurize's own check, older
        run_featurize(
            FeaturizeConfig(run=run.root, model=str(tiny_model_dir), draws=4, device="cpu", batch_clips=3)
        )
    run_encode(_encode_cfg(run, demo_data, tiny_model_dir))
    assert {
        i: _sha(run.latents.shard_path(i)) for i in run.latents.done_shards()
    } == shards  # nothing re-encoded
    assert _top(_score(run, demo_data)) == before


def test_the_cli_says_it_in_one_line_with_exit_2(run: RunDir, demo_data: Path) -> None:
    _flip(run.faiss_path, 0.5)
    q = demo_data / "videos" / "demo-00001.mp4"
    r = CliRunner().invoke(app, ["score", "-r", str(run.root), str(q), "-p", "a clip", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "index.faiss is damaged" in errors[0] and "Traceback" not in r.output
