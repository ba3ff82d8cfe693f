"""Whether a clip is long enough for a frame policy, from its timeline alone (no decoding).

The arithmetic is `decode.select_frames`' own (exact: integer ticks x the stream's rational time base,
the rate as the fraction its decimal text names): frame k of the policy is the frame displayed at
t0 + k/fps, and a target at or past the end of the last displayed frame is outside the clip. Such
targets are what `pad_short` fills with the last frame and what, without it, makes a `too_short`
failure; with fps 0 (consecutive frames) the frames beyond the clip's count are.

So `pad_short` changes only the clips that would otherwise fail too_short (or, for a truncated file,
whose intact prefix is too short): every clip that fits gets the same frames with it or without it,
which is why `encode` records it as a policy of the run rather than as part of its fingerprint.

    predict_too_short(probe_video("clip.mp4"), FramePolicy(frames=17, fps=8))   # True: 1.5 s < 2 s
    frames_past_end(p.display_pts, p.end_pts, p.time_base, policy)             # frames padded
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any


def _rate(fps: float) -> Fraction:
    """A user-given rate as an exact fraction of its decimal text (as `decode._fraction`)."""
    return Fraction(repr(float(fps)))


def frames_past_end(display_pts: list[int], end_pts: int, time_base: Fraction, policy: Any) -> int:
    """How many of the policy's F frames lie at or past the clip's end (`end_pts`, ticks): the frames
    `pad_short` repeats, 0 when the clip is long enough. display_pts: ascending pts (ticks) of the
    displayed frames; time_base: seconds per tick; policy: a `FramePolicy` (frames, fps)."""
    n = len(display_pts)
    if n == 0:
        return policy.frames
    if policy.fps == 0:
        return max(0, policy.frames - n)
    start, rate = display_pts[0], _rate(policy.fps)
    # target_k = start + k / rate / time_base >= end_pts  <=>  k >= (end_pts - start) * time_base * rate
    first_out = (end_pts - start) * Fraction(time_base) * rate  # the first k outside the clip, as a bound
    k0 = max(0, -((-first_out.numerator) // first_out.denominator))  # ceil
    return max(0, policy.frames - k0)


def predict_too_short(probe: Any, policy: Any) -> bool:
    """Whether `probe` (a `VideoProbe`) would fail `too_short` under `policy` without decoding it: it
    is shorter than the policy needs and the policy does not pad. A truncated file is judged on its
    listed timeline; decoding judges its intact prefix, and fails `truncated` when that is short."""
    if policy.pad_short:
        return False
    return frames_past_end(probe.display_pts, probe.end_pts, probe.time_base, policy) > 0


def needed_seconds(policy: Any) -> float | None:
    """How long a clip must be shown for the policy (more than this), seconds; None for fps 0."""
    return float((policy.frames - 1) / _rate(policy.fps)) if policy.fps else None
