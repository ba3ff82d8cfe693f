from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.video.decode import FramePolicy
from carv_attrib.video.frames import contact_sheet, inspect_frames, write_png
from tests.video.corpus import ffmpeg_exe, make, read_number, run

FF = ffmpeg_exe()


@pytest.mark.skipif(FF is None, reason="imageio-ffmpeg is not installed")
def test_inspect_a_stream_copied_cut(tmp_path: Path) -> None:
    src = make(FF, tmp_path / "src.mp4", 90, "30")
    cut = tmp_path / "cut.mp4"
    run(FF, ["-ss", "1.5", "-i", str(src), "-c", "copy", str(cut)])
    policy = FramePolicy(frames=5, height=64, width=96, fps=4)
    rep = inspect_frames(cut, policy, with_frames=True)
    pixels = rep.pop("pixels")
    json.dumps(rep)  # JSON-ready
    assert rep["status"] == "ok" and rep["decoder"] == "pyav"
    assert rep["probe"]["edit_list"] and rep["probe"]["codec"] == "h264" and rep["probe"]["discarded"] > 0
    assert [f["target"] for f in rep["frames"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # 30 fps: the frame shown at t s after the first is display frame floor(30 t)
    assert [f["index"] for f in rep["frames"]] == [0, 7, 15, 22, 30]
    assert [read_number(p)[0] for p in pixels] == [45 + i for i in [0, 7, 15, 22, 30]]
    forced = inspect_frames(cut, policy, decoder="pyav")
    assert forced["frames"] == rep["frames"]


def test_inspect_reports_failures_without_raising(tmp_path: Path) -> None:
    rep = inspect_frames(tmp_path / "nope.mp4", FramePolicy())
    assert rep["status"] == "missing" and rep["probe"] is None and rep["frames"] == []
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    rep = inspect_frames(tmp_path / "noise.mp4", FramePolicy())
    assert rep["status"] == "decode_error" and rep["error"]


@pytest.mark.skipif(FF is None, reason="imageio-ffmpeg is not installed")
def test_inspect_too_short_gives_numbers(tmp_path: Path) -> None:
    clip = make(FF, tmp_path / "short.mp4", 4, "8")
    rep = inspect_frames(clip, FramePolicy(frames=9, height=64, width=96, fps=8))
    assert rep["status"] == "too_short"
    assert rep["details"]["available_frames"] == 4 and rep["details"]["needed_frames"] == 9
    assert rep["probe"]["display_frames"] == 4


def test_contact_sheet_layout_and_png(tmp_path: Path) -> None:
    frames = np.zeros((5, 4, 6, 3), np.uint8)
    for k in range(5):
        frames[k] = 40 * k + 10
    out = contact_sheet(frames, tmp_path / "sheet.png", columns=3, gap=1, scale=2)
    PIL = pytest.importorskip("PIL.Image")
    img = np.asarray(PIL.open(out).convert("RGB"))
    assert img.shape == (2 * (8 + 1) - 1, 3 * (12 + 1) - 1, 3)
    assert img[0, 0, 0] == 10 and img[9, 0, 0] == 130 and img[9, 13, 0] == 170  # frames 0, 3, 4
    assert img[8, 0, 0] == 0 and img[9, 27, 0] == 0  # gap, and the empty sixth tile


def test_write_png_roundtrip(tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    x = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(PIL.open(write_png(x, tmp_path / "x.png"))), x)
    with pytest.raises(ValueError, match="RGB"):
        write_png(x[..., 0], tmp_path / "bad.png")
