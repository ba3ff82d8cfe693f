"""One picture whichever decoder runs (issue 23, item 6).

A stream-copied cut goes to PyAV (its edit list), the uncut source to decord; both must give the same
pixels for the same displayed source frame, at native size and after the resize. Both decoders decode
one H.264 bitstream (H.264 decoding is bit-exact by the standard) and hand over FFmpeg's YUV->RGB at the
stored size, and every frame is then scaled by the one `resize_frame`, so the tolerance is 0: exact
equality (measured: 0 differing bytes on this source, natively and resized).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carv_attrib.video.decode import FramePolicy, decode_clip
from carv_attrib.video.resize import resize_frame
from tests.video.corpus import ffmpeg_exe, run

FF = ffmpeg_exe()
pytestmark = pytest.mark.skipif(FF is None, reason="imageio-ffmpeg is not installed")


@pytest.fixture(scope="module")
def source_and_cut(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """60 frames of FFmpeg's `testsrc2` (colour bars, gradients, moving text: chroma and fine detail
    that a resize filter changes visibly), 160x90 at 30 fps, x264 with B-frames and a 1 s GOP; and its
    `-ss 1.5 -c copy` cut, whose edit list hides 15 pre-roll frames (source frames 45..59 shown)."""
    d = tmp_path_factory.mktemp("one-picture")
    src, cut = d / "uncut.mp4", d / "cut.mp4"
    run(
        FF,
        ["-f", "lavfi", "-i", "testsrc2=size=160x90:rate=30:duration=2"]
        + ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "23", "-bf", "2", "-g", "30"]
        + ["-pix_fmt", "yuv420p", str(src)],
    )
    run(FF, ["-ss", "1.5", "-i", str(src), "-c", "copy", str(cut)])
    return src, cut


@pytest.mark.parametrize(
    "size",
    [(160, 90), (64, 48), (64, 64), (320, 176)],  # native; shrink + crop; shrink + crop; enlarge + crop
)
def test_cut_through_pyav_equals_uncut_through_decord(source_and_cut: tuple[Path, Path], size) -> None:
    src, cut = source_and_cut
    w, h = size
    # fps 0: consecutive displayed frames; the uncut clip's frames 45..49 are the cut's 0..4.
    whole = decode_clip(str(src), FramePolicy(frames=53, height=h, width=w, fps=0))
    part = decode_clip(str(cut), FramePolicy(frames=5, height=h, width=w, fps=0))
    assert whole.decoder == "decord" and part.decoder == "pyav", (whole.reasons, part.reasons)
    assert part.reasons and part.reasons[0].startswith("edit list")
    assert np.array_equal(whole.frames[45:50], part.frames)


@pytest.mark.parametrize("size", [(160, 90), (64, 48), (96, 96)])
def test_forced_pyav_equals_decord_on_one_file(source_and_cut: tuple[Path, Path], size) -> None:
    src, _ = source_and_cut
    w, h = size
    policy = FramePolicy(frames=9, height=h, width=w, fps=8)
    auto, forced = decode_clip(str(src), policy), decode_clip(str(src), policy, "pyav")
    assert (auto.decoder, forced.decoder) == ("decord", "pyav")
    assert auto.indices == forced.indices
    assert np.array_equal(auto.frames, forced.frames)


def test_resize_frame_is_antialiased_bicubic_and_identity_at_size() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    assert resize_frame(img, (160, 90)) is img  # no resampling at the stored size
    out = resize_frame(img, (40, 23))
    assert out.shape == (23, 40, 3) and out.dtype == np.uint8
    # Antialiased: shrinking noise 4x averages it (a point-sampling cubic would keep the full spread).
    assert out.astype(float).std() < 0.5 * img.astype(float).std()
    checker = np.kron((np.indices((45, 80)).sum(0) % 2 * 255).astype(np.uint8), np.ones((2, 2), np.uint8))
    grey = resize_frame(np.repeat(checker[:, :, None], 3, axis=2), (40, 23))
    assert abs(float(grey.mean()) - 127.5) < 3 and grey.std() < 20  # a 4x4-pixel checkerboard -> grey
