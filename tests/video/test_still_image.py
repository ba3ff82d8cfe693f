"""Still images given as videos (issue 24, item 5): a PNG renamed `.mp4` is a `still_image` failure
(encode records it, `frames` reports it, `score` refuses it as a query), whatever the frame policy,
--pad-short included; an animated GIF or APNG is a video; an animated WebP, which FFmpeg's webp
decoder cannot read, is `unsupported_codec`; a one-frame MP4 is a (short) video, not a picture.
The files are generated here with PIL and PyAV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carv_attrib.errors import EXIT_USAGE, UsageError
from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip
from carv_attrib.video.failures import FAILURE_KINDS, failure_message
from carv_attrib.video.frames import inspect_frames
from carv_attrib.video.probe import probe_video, still_image_of

REPO = Path(__file__).resolve().parents[2]
POLICY = FramePolicy(frames=9, height=32, width=32, fps=8)
PADDED = FramePolicy(frames=9, height=32, width=32, fps=8, pad_short=True)


def _pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


STILLS = {  # PIL format -> FFmpeg demuxer that reads it
    "PNG": "png_pipe",
    "JPEG": "jpeg_pipe",
    "WEBP": "webp_pipe",
    "BMP": "bmp_pipe",
    "TIFF": "tiff_pipe",
    "GIF": "gif",  # a one-frame GIF: a picture
}


def still(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"{fmt.lower()}-renamed.mp4"
    _pictures(1)[0].save(path, format=fmt)
    return path


def animation(tmp_path: Path, fmt: str, frames: int = 12, ms: int = 100) -> Path:
    """`frames` pictures shown `ms` each, looping: 12 x 100 ms = 1.2 s, enough for 9 frames at 8 fps."""
    path = tmp_path / f"animated-{frames}.{fmt.lower()}"
    first, *rest = _pictures(frames, seed=1)
    first.save(path, format=fmt, save_all=True, append_images=rest, duration=ms, loop=0)
    return path


def one_frame_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.asarray(_pictures(1)[0]), format="rgb24")
        for pkt in [*s.encode(frame), *s.encode()]:
            c.mux(pkt)
    return path


@pytest.mark.parametrize("fmt", sorted(STILLS))
def test_a_picture_is_still_image_whatever_its_name_and_policy(tmp_path: Path, fmt: str) -> None:
    path = still(tmp_path, fmt)
    with pytest.raises(ClipFailure) as exc:
        probe_video(str(path))
    assert exc.value.kind == "still_image"
    assert exc.value.details["container"] == STILLS[fmt] and "--" not in exc.value.message
    for policy in (POLICY, PADDED, FramePolicy(frames=1, height=32, width=32, fps=8)):  # even 1 frame
        with pytest.raises(ClipFailure) as exc:
            decode_clip(str(path), policy)
        assert exc.value.kind == "still_image"
    rep = inspect_frames(path, PADDED)
    assert rep["status"] == "still_image" and rep["frames"] == []
    assert still_image_of(str(path)) is not None


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])  # an animated GIF, an APNG
def test_an_animated_gif_or_apng_is_a_video(tmp_path: Path, fmt: str) -> None:
    path = animation(tmp_path, fmt)
    p = probe_video(str(path))
    assert len(p.display_pts) == 12
    clip = decode_clip(str(path), POLICY)
    assert clip.frames.shape == (9, 32, 32, 3) and clip.indices == [0, 1, 2, 3, 5, 6, 7, 8, 10]
    assert still_image_of(str(path)) is None
    with pytest.raises(ClipFailure) as exc:  # a short animation is short, not a picture
        decode_clip(str(animation(tmp_path, fmt, frames=3)), POLICY)
    assert exc.value.kind == "too_short"


def test_an_animated_webp_is_unsupported_not_a_picture(tmp_path: Path) -> None:
    path = animation(tmp_path, "WEBP")
    for policy in (POLICY, PADDED):  # was: ZeroDivisionError with --pad-short (no decoded size)
        with pytest.raises(ClipFailure) as exc:
            decode_clip(str(path), policy)
        assert exc.value.kind == "unsupported_codec" and "animated WebP" in exc.value.message
    assert still_image_of(str(path)) is None


def test_a_one_frame_mp4_is_a_short_video(tmp_path: Path) -> None:
    path = one_frame_mp4(tmp_path / "one.mp4")
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(path), POLICY)
    assert exc.value.kind == "too_short"
    assert decode_clip(str(path), PADDED).indices == [0] * 9
    assert still_image_of(str(path)) is None


def test_still_image_is_a_listed_kind_with_advice() -> None:
    assert "still_image" in FAILURE_KINDS
    f = ClipFailure("still_image", "a still image (png, ...)")
    assert "--pad-short does not" in failure_message(f, "encode")
    assert "video" in failure_message(f, "score")


def test_score_refuses_a_picture_query_before_loading_anything(tmp_path: Path) -> None:
    from carv_attrib.pipeline.score import ScoreConfig, run_score

    path = still(tmp_path, "PNG")
    with pytest.raises(UsageError, match="still image"):  # no run there: refused before it is read
        run_score(ScoreConfig(run=tmp_path / "no-run", queries=[path], prompt="x", device="cpu"))


def test_score_cli_refusal_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = still(tmp_path, "JPEG")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", "from carv_attrib.cli.app import main; main()", "score", str(path),
         "--run", str(tmp_path / "no-run"), "--prompt", "x", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == EXIT_USAGE, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "still image" in lines[0], res.stderr


def test_encode_records_a_picture_and_encodes_the_animation(
    tmp_path: Path, demo_data: Path, tiny_model_dir: Path
) -> None:
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode
    from carv_attrib.store.shards import ShardStore

    videos = tmp_path / "v"
    videos.mkdir()
    good = sorted((demo_data / "videos").glob("*.mp4"))[0]
    (videos / good.name).write_bytes(good.read_bytes())
    still(tmp_path, "PNG").rename(videos / "picture.mp4")
    animation(tmp_path, "GIF").rename(videos / "anim.mp4")  # FFmpeg reads the content, not the name
    rows = [
        {"vid": good.stem, "caption": "a"},
        {"vid": "picture", "caption": "b"},
        {"vid": "anim", "caption": "c"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    cfg = EncodeConfig(
        manifest=tmp_path / "m.json", videos=videos, model=str(tiny_model_dir), run=tmp_path / "run",
        frames=9, size="32x32", fps=8, workers=1, device="cpu", pad_short=True,
    )  # fmt: skip
    s = run_encode(cfg)
    assert (s.ok, s.failures) == (2, {"still_image": 1})
    got = {r["vid"]: r for r in ShardStore(tmp_path / "run", "latents").read_table().to_pylist()}
    assert got["picture"]["status"] == "still_image" and "--pad-short does not" in got["picture"]["error"]
    assert got["anim"]["status"] == "ok" and got["anim"]["decoder"] == "pyav"
