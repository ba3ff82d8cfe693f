"""Real-world inputs through the commands: `frames`, decoder provenance in the latents and `status`,
too-short advice per command, captions printed literally, IVF indexes that return k hits, and bad
FAISS factories refused with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.lds.synthetic import write_mp4
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.run import RunDir

runner = CliRunner()
MARKUP = "a [b]red[/b] square [/INST] moving left"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_frame(path: Path) -> Path:
    write_mp4(path, np.full((1, 32, 32, 3), 128, np.uint8), fps=8)
    return path


def test_frames_reports_timestamps_decoder_and_writes_the_sheet(demo_data: Path, tmp_path: Path) -> None:
    clip = demo_data / "videos" / "demo-00000.mp4"
    r = invoke(
        "frames",
        clip,
        "--frames",
        "5",
        "--fps",
        "4",
        "--png",
        tmp_path / "s.png",
        "--npy",
        tmp_path / "f.npy",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["status"] == "ok" and rep["decoder"] in ("decord", "pyav")
    assert [f["target"] for f in rep["frames"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the demo clips are 8 fps, constant rate: the frame shown at k/4 s is source frame 2k, exactly
    assert [f["index"] for f in rep["frames"]] == [0, 2, 4, 6, 8]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "f.npy").shape == (5, 64, 64, 3)


def test_frames_too_short_names_advice_frames_accepts(tmp_path: Path) -> None:
    r = invoke("frames", _one_frame(tmp_path / "one.mp4"), "--format", "json")
    assert r.exit_code == 3
    rep = json.loads(r.stdout)
    assert rep["status"] == "too_short" and "--pad-short" in rep["error"]
    r = invoke("frames", tmp_path / "one.mp4", "--pad-short", "--frames", "5", "--format", "json")
    assert r.exit_code == 0 and [f["index"] for f in json.loads(r.stdout)["frames"]] == [0] * 5


def test_latents_record_decoder_and_timestamps_and_status_counts_them(encoded_run: Path) -> None:
    t = RunDir(encoded_run).latents.read_table(
        columns=["status", "decoder", "frame_timestamps", "frame_indices", "fps"]
    )
    rows = [r for r in t.to_pylist() if r["status"] == "ok"]
    assert rows and all(r["decoder"] == "decord" for r in rows)  # plain constant-rate H.264
    for r in rows:  # demo clips are 8 fps and encode samples at 8 fps: frame k at k/8 s
        assert r["frame_indices"] == list(range(9))
        assert r["frame_timestamps"] == pytest.approx([k / 8 for k in range(9)], abs=1 / 8 / 2)
    r = invoke("status", encoded_run, "--format", "json")
    assert json.loads(r.stdout)["latents"]["decoders"] == {"decord": len(rows)}


def test_score_too_short_query_gets_advice_score_can_follow(featurized_run: Path, tmp_path: Path) -> None:
    doc = run_score(
        ScoreConfig(run=featurized_run, queries=[_one_frame(tmp_path / "q.mp4")], prompt="x", device="cpu")
    )
    (q,) = doc["queries"]
    assert q["status"] == "error" and q["error"].startswith("too_short:")
    assert "longer query" in q["error"] and "pass --pad-short" not in q["error"]


def test_captions_with_markup_print_literally(featurized_run: Path, demo_data: Path) -> None:
    query = demo_data / "videos" / "demo-00001.mp4"
    r = invoke(
        "score",
        query,
        "--run",
        featurized_run,
        "--prompt",
        MARKUP,
        "--format",
        "human",
        "--device",
        "cpu",
        "-k",
        "2",
    )
    assert r.exit_code == 0, r.output
    assert "[b]red[/b] square [/INST]" in " ".join(r.stdout.split())  # wrapped, not swallowed


def test_ivf_index_returns_k_hits_and_records_nprobe(featurized_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    n = len(feature_matrix(run)[0])
    info = build_run_index(IndexConfig(run=run, precondition="cosine", index_factory="IVF4,Flat", nprobe=1))
    assert info.nprobe == 1 and RunDir(run).index_info().nprobe == 1
    doc = run_score(
        ScoreConfig(run=run, queries=[_clip(featurized_run)], prompt="x", top_k=None, device="cpu")
    )
    assert len(doc["queries"][0]["results"]) == n  # every clip, although one list was asked for
    assert doc["index"]["factory"] == "IVF4,Flat" and doc["index"]["nprobe"] == 1


def _clip(run: Path) -> Path:
    """The video of the run's first training clip."""
    clips = RunDir(run).clips()
    return Path(clips[next(iter(clips))]["path"])


@pytest.mark.parametrize("factory", ["IVF4,Flatt", "PQ7"])
def test_bad_factory_is_refused_with_exit_2_and_one_line(
    featurized_run: Path, tmp_path: Path, factory: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    before = (run / "index" / "index_info.json").read_bytes()
    r = invoke("index", run, "--index-factory", factory)
    assert r.exit_code == 2, r.output
    assert (
        len(r.stderr.strip().splitlines()) == 1
        and "--index-factory" in r.stderr
        and "Traceback" not in r.output
    )
    assert (run / "index" / "index_info.json").read_bytes() == before  # the old index is untouched
