"""`video.shortness`: whether a clip fits a frame policy, from its timeline alone, agrees exactly with
`select_frames` (too_short without --pad-short, the padded frames with it), on constant and variable
frame rates, odd time bases and rates, and the boundary where a clip lasts exactly (F-1)/fps."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip, select_frames
from carv_attrib.video.probe import probe_video
from carv_attrib.video.shortness import frames_past_end, needed_seconds, predict_too_short


def fails_too_short(pts: list[int], end: int, tb: Fraction, policy: FramePolicy) -> bool:
    try:
        select_frames(pts, end, tb, policy)
    except ClipFailure as exc:
        assert exc.kind == "too_short"
        return True
    return False


def test_frames_past_end_agrees_with_select_frames_on_random_timelines() -> None:
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 40))
        tb = Fraction(1, int(rng.choice([24, 25, 30, 90000, 600, 1000])))
        gaps = rng.integers(1, 60, n) if trial % 2 else np.full(n, int(rng.integers(1, 60)))
        start = int(rng.integers(0, 1000))
        pts = [start + int(x) for x in np.cumsum(np.concatenate([[0], gaps[:-1]]))]
        end = pts[-1] + int(gaps[-1])
        fps = float(rng.choice([0, 4, 8, 12.5, 16, 23.976, 29.97, 30]))
        frames = int(rng.choice([1, 5, 9, 17, 33]))
        policy = FramePolicy(frames=frames, fps=fps)
        past = frames_past_end(pts, end, tb, policy)
        assert (past > 0) == fails_too_short(pts, end, tb, policy), (trial, pts, end, tb, policy)
        padded = select_frames(pts, end, tb, FramePolicy(frames=frames, fps=fps, pad_short=True))
        unpadded_part = frames - past
        if past:  # the padded frames are the last frame, after the ones the clip holds
            assert padded[unpadded_part:] == [n - 1] * past


def test_the_boundary_is_exclusive() -> None:
    # 17 frames at 8 fps need more than 2 s: a clip shown exactly 2 s (16 frames at 8 fps) runs out
    tb = Fraction(1, 8)
    policy = FramePolicy(frames=17, fps=8)
    assert frames_past_end(list(range(16)), 16, tb, policy) == 1
    assert frames_past_end(list(range(17)), 17, tb, policy) == 0
    assert needed_seconds(policy) == 2.0 and needed_seconds(FramePolicy(fps=0)) is None


def test_predict_too_short_from_a_probe(demo_data: Path) -> None:
    video = sorted((demo_data / "videos").glob("*.mp4"))[0]  # 24 frames at 8 fps: 3 s
    p = probe_video(str(video))
    assert not predict_too_short(p, FramePolicy(frames=17, fps=8))
    assert predict_too_short(p, FramePolicy(frames=33, fps=8))
    assert not predict_too_short(p, FramePolicy(frames=33, fps=8, pad_short=True))
    assert predict_too_short(p, FramePolicy(frames=25, fps=0)) and not predict_too_short(
        p, FramePolicy(frames=21, fps=0)
    )
    with pytest.raises(ClipFailure):
        decode_clip(str(video), FramePolicy(frames=33, height=32, width=32, fps=8))
    clip = decode_clip(str(video), FramePolicy(frames=33, height=32, width=32, fps=8, pad_short=True))
    assert clip.padded == 33 - 24 and clip.indices[24:] == [23] * 9
    assert decode_clip(str(video), FramePolicy(frames=17, height=32, width=32, fps=8)).padded == 0
