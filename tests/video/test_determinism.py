"""A partly corrupt file always yields the same frames or always fails with the same reason, in this
process or in worker processes."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.video.decode import ClipFailure, DecodedClip, FramePolicy, decode_clip
from carv_attrib.video.pool import DecodePool
from tests.video.corpus import ffmpeg_exe, make

FF = ffmpeg_exe()
pytestmark = pytest.mark.skipif(FF is None, reason="imageio-ffmpeg is not installed (pip install .[test])")
POLICY = FramePolicy(frames=17, height=64, width=96, fps=8)


def outcome(r: DecodedClip | ClipFailure) -> tuple:
    """What is recorded for a clip, less the decoder's name: decord's threaded decoder reports a
    packet that fails to decode only if its worker thread gets there first (a race), and then PyAV
    takes over; on these files both give the same frames, which is what this test pins down."""
    if isinstance(r, ClipFailure):
        return ("fail", r.kind, r.message)
    return ("ok", tuple(r.indices), tuple(r.timestamps), r.frames.tobytes())


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("damaged")
    src = make(FF, d / "src.mp4", 48, "8", fmt=["-movflags", "+faststart"]).read_bytes()
    rng = np.random.default_rng(0)
    out = []
    # Noise over the middle of the media data, zeros over a keyframe, a cut mid-packet, noise in
    # the index (moov at the front).
    edits = [
        (int(len(src) * 0.55), rng.bytes(400)),
        (int(len(src) * 0.35), bytes(800)),
        (int(len(src) * 0.12), rng.bytes(64)),
    ]
    for i, (at, blob) in enumerate(edits):
        data = bytearray(src)
        data[at : at + len(blob)] = blob
        (d / f"noise{i}.mp4").write_bytes(bytes(data))
        out.append(str(d / f"noise{i}.mp4"))
    (d / "cut.mp4").write_bytes(src[: int(len(src) * 0.8)])
    out.append(str(d / "cut.mp4"))
    return out


def test_same_result_in_process_and_in_workers(damaged: list[str]) -> None:
    first = [outcome(_try(p)) for p in damaged]
    again = [outcome(_try(p)) for p in damaged]
    with DecodePool(POLICY, workers=2, timeout=60) as pool:
        pooled = [outcome(r) for _, r in pool.imap(list(enumerate(damaged + damaged[::-1])))]
    assert first == again
    assert pooled[: len(damaged)] == first and pooled[len(damaged) :] == first[::-1]


def _try(path: str) -> DecodedClip | ClipFailure:
    try:
        return decode_clip(path, POLICY)
    except ClipFailure as exc:
        return exc
