"""Decode clips into fixed-size frame stacks for the Wan VAE, choosing frames by presentation time.

Frame policy (defaults are demo scale; Wan2.1-T2V itself is trained at 81 frames, 480x832, 16 fps):
- F = `frames` (default 17) frames, F = 1 + 4k because the VAE encodes the first frame and then
  chunks of 4 and silently drops a remainder;
- sampled at `fps` (default 8): frame k is the frame *displayed* at k/fps seconds after the first
  displayed frame, i.e. the last frame whose presentation timestamp (pts) is <= t0 + k/fps, the
  way a player shows a video. Timestamps come from the container (`video/probe.py`), with MP4 edit
  lists applied as FFmpeg applies them, so constant and variable frame rates, stream-copied cuts
  and non-zero start times all select the frames a viewer sees. `fps=0` takes consecutive
  displayed frames. Time is exact (integer ticks x the stream's rational time base);
- display geometry as a player (FFmpeg's `ffmpeg`/`ffplay` autorotate) shows it: the sample aspect
  ratio (SAR) stretches the stored W x H picture to W*SAR x H and the display matrix rotates it by
  a multiple of 90 degrees; the displayed picture is then resized so it covers H x W (the shorter
  side relative to the target aspect) and centre-cropped to H x W (default 64x64); H, W multiples
  of 16 (8x VAE x 2x patch) because the transformer crops odd latent sizes silently;
- a clip that does not last long enough is a `too_short` failure, unless `pad_short` repeats its
  last frame.

Decoders: decord is the fast path (seeks, decodes only what is needed). A cheap PyAV probe
(`probe_video`: one demux pass, one decoded frame) detects what decord gets wrong, and such clips
are decoded with PyAV (sequential decode, FFmpeg's own behaviour):
- edit lists (decord returns the hidden pre-roll frames and seeks wrongly around them);
- no container duration (decord cannot index a live WebM);
- rotation (decord 0.6 rotates some files itself, then resizes to the size asked for as if
  unrotated);
- codecs outside `DECORD_CODECS` (decord fails on AV1) and containers outside `DECORD_CONTAINERS`
  (decord returned frame 30 for frame 0 of a 30 fps MPEG-TS);
- truncated or corrupt data, duplicate timestamps, and any clip where decord fails, returns
  malformed frames, or where its frame count or timestamps disagree with the probe.
A variable frame rate does not need PyAV: decord's frame i is the i-th frame in presentation
order, the frames are picked from the probe's timestamps (the old constant-rate picking was the
bug) and checked against decord's own. Nor does a non-square SAR: `storage_size` includes it.

One picture whichever decoder runs: both decoders hand over each frame as RGB at its *stored* size
(FFmpeg's YUV->RGB, which gives identical bytes for the same bitstream through decord and PyAV) and
every frame is then scaled to `storage_size` by the one function `video/resize.py:resize_frame`
(Pillow's antialiased bicubic, fixed-point), frame by frame, uint8 in and out; decord's own scaler
(bilinear) and PyAV's `reformat` scaling (swscale bicubic) are no longer used, so routing a file to
one decoder or the other (a stream-copied cut goes to PyAV, its uncut source to decord) does not
change its pixels. Rotation and the centre crop follow the resize. `DecodedClip.decoder` records which decoder ran,
`DecodedClip.timestamps` the presentation times of the frames taken (seconds after the first
displayed frame) and `DecodedClip.start` that frame's own pts (seconds).

A clip may be a member of a WebDataset tar or a value of an Arrow file (`video.member`: its path names
the byte range): the probe and both decoders read that range in place, so its frames are the loose
file's.

Failure kinds (`ClipFailure.kind`; the message says what is wrong without repeating the kind, so
"{kind}: {message}" reads well, and never names a CLI flag, so callers add their own advice):
- `missing`: the file does not exist;
- `not_a_file`: the path is a directory, named pipe (FIFO), socket or device, told from its inode
  alone (`special_file_kind`): it is never opened, because reading a FIFO blocks until a writer comes
  and a device may never end;
- `decode_error`: empty file, not a container FFmpeg can read, or frames that do not decode;
- `no_video`: the container has no video stream (e.g. audio only);
- `still_image`: one picture (PNG, JPEG, WebP, one-frame GIF, ...), whatever the file is named
  (`probe.still_image_failure`); an animated GIF or APNG is a video;
- `unsupported_codec`: no decoder for the stream's codec in this FFmpeg build (the codec is named);
- `truncated`: the file ends early (interrupted copy) and its intact prefix is too short for the
  policy (a long enough intact prefix is decoded normally);
- `too_short`: the clip is shorter than the policy needs; `details` holds available_frames,
  available_seconds, needed_frames, needed_seconds;
- `timeout`, `crash`: set by `DecodePool` when a worker hangs or dies.

Determinism: the choice of decoder depends only on the file's bytes, PyAV decodes with one thread
and stops at the first lost packet, so a damaged file always gives the same frames or the same
failure, in or out of worker processes.

    policy = FramePolicy(frames=17, height=64, width=64, fps=8)
    clip = decode_clip("videos/v1.mp4", policy)   # clip.frames: uint8 (F, H, W, 3)
    clip.decoder, clip.indices, clip.timestamps   # "decord" | "pyav", display frame numbers, seconds
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from carv_attrib.errors import UsageError
from carv_attrib.video.failures import ClipFailure
from carv_attrib.video.member import (
    av_input,
    close_input,
    describe,
    parse_member,
    source_bytes_available,
    source_exists,
)
from carv_attrib.video.resize import resize_frame, resize_stack
from carv_attrib.video.shortness import frames_past_end


@dataclass(frozen=True)
class FramePolicy:
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float = 8.0
    pad_short: bool = False

    def validate(self) -> FramePolicy:
        if self.frames < 1 or self.frames % 4 != 1:
            lo = max(1, self.frames - (self.frames - 1) % 4)
            raise UsageError(
                f"--frames {self.frames}: Wan2.1's VAE needs 1 + 4k frames (e.g. {lo} or {lo + 4}); "
                "it would silently drop the remainder"
            )
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise UsageError(
                f"--size {self.width}x{self.height}: width and height must be positive multiples of 16 "
                "(8x VAE downsampling x 2x transformer patch)"
            )
        if self.fps < 0:
            raise UsageError(f"--fps {self.fps}: must be >= 0 (0 = consecutive source frames)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' or 'N' (square) → (width, height)."""
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            return int(w), int(h)
        return int(text), int(text)
    except ValueError as exc:
        raise UsageError(f"--size {text!r}: expected WxH, e.g. 64x64 or 832x480") from exc


def _fraction(x: float) -> Fraction:
    """A user-given rate as an exact fraction: 29.97 -> 2997/100 (its decimal text, not its binary
    float, so k/29.97 s lands where the user means)."""
    return Fraction(repr(float(x)))


def select_frames(
    display_pts: list[int], end_pts: int, time_base: Fraction, policy: FramePolicy
) -> list[int]:
    """Display-order frame numbers (0 = first displayed frame) of the F frames the policy takes.

    display_pts: ascending pts (ticks) of the displayed frames; end_pts: when the last one stops
    being shown (ticks); time_base: seconds per tick. Frame k is the last frame with
    pts <= pts[0] + k/fps (exact rational arithmetic); fps 0: frames 0..F-1. A target at or past
    `end_pts` is outside the clip: ClipFailure too_short, or the last frame with `pad_short`.
    """
    n = len(display_pts)
    if n == 0:
        raise ClipFailure("decode_error", "no displayable frames")
    if policy.fps == 0:
        idx = list(range(policy.frames))
        if idx[-1] < n:
            return idx
        if not policy.pad_short:
            raise ClipFailure(
                "too_short",
                f"clip has {n} frame{'s' * (n != 1)}; {policy.frames} consecutive frames are needed",
                {
                    "available_frames": n,
                    "available_seconds": float((end_pts - display_pts[0]) * time_base),
                    "needed_frames": policy.frames,
                    "needed_seconds": None,
                },
            )
        return [min(i, n - 1) for i in idx]
    start = display_pts[0]
    rate = _fraction(policy.fps)
    idx = []
    for k in range(policy.frames):
        target = start + Fraction(k) / rate / time_base  # ticks, exact
        if target >= end_pts:
            if not policy.pad_short:
                avail = float((end_pts - start) * time_base)
                need = float((policy.frames - 1) / rate)
                raise ClipFailure(
                    "too_short",
                    f"clip shows {n} frame{'s' * (n != 1)} over {avail:.3f} s; {policy.frames} frames at "
                    f"{policy.fps:g} fps need more than {need:.3f} s (it runs out at frame {k + 1} of {policy.frames})",
                    {
                        "available_frames": n,
                        "available_seconds": avail,
                        "needed_frames": policy.frames,
                        "needed_seconds": need,
                    },
                )
            idx.append(n - 1)
            continue
        idx.append(bisect.bisect_right(display_pts, math.floor(target)) - 1)
    return idx


def frame_indices(num_source: int, source_fps: float, policy: FramePolicy) -> list[int]:
    """`select_frames` for a constant-rate clip of `num_source` frames at `source_fps` (frame i shown
    from i/source_fps to (i+1)/source_fps). Raises ClipFailure too_short."""
    rate = _fraction(source_fps) if source_fps > 0 else Fraction(1)
    return select_frames(list(range(num_source)), num_source, 1 / rate, policy)


def cover_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """Smallest (w, h) with the source aspect ratio that covers width x height."""
    scale = max(width / src_w, height / src_h)
    return max(width, round(src_w * scale)), max(height, round(src_h * scale))


@dataclass
class DecodedClip:
    """frames: uint8 numpy (F, H, W, 3) RGB; indices: display-order frame numbers taken (0 = first
    displayed frame); timestamps: their presentation timestamps in seconds after the first displayed
    frame's (the edit list applied; equal to FFmpeg's pts_time for the usual file that starts at 0,
    while the ffmpeg CLI shifts e.g. MPEG-TS by the container's start time); start: the first
    displayed frame's pts in seconds (the offset of `timestamps`); source_fps: displayed frames per second of the
    clip on average (frames / shown duration); source_frames: displayed frames in the clip;
    decoder: "decord" or "pyav"; reasons: why PyAV was used (empty for decord)."""

    frames: Any
    indices: list[int]
    source_fps: float
    source_frames: int
    decoder: str = "decord"
    timestamps: list[float] = field(default_factory=list)
    start: float = 0.0
    reasons: list[str] = field(default_factory=list)
    motion: Any = None  # (F, H/8, W/8) float32 flow magnitudes when decoded for motion masks
    padded: int = 0  # frames past the clip's end, repeats of its last frame (pad_short; `shortness`)


# Codecs decord (its bundled FFmpeg) indexes and seeks correctly in the common containers; others go
# to PyAV, which decodes whatever its FFmpeg build has a decoder for (e.g. AV1 via libdav1d).
DECORD_CODECS = frozenset({"h264", "hevc", "mpeg4", "vp8", "vp9", "mpeg2video", "mjpeg"})
# FFmpeg demuxer names (VideoProbe.container) whose files decord indexes and seeks right; MPEG-TS and
# MPEG-PS are not among them (decord returned frame 30 for frame 0 of a 30 fps .ts in the corpus).
DECORD_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
# Frames decord hands over per get_batch: at 1920x1080 that is 8 x 6.2 MB of stored-size RGB at once.
DECORD_CHUNK = 8


def probe(path: str) -> tuple[int, float, int, int]:
    """(frame count, average fps, width, height) of a video as decord sees it (no quirk handling;
    kept for comparisons and tests)."""
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    h, w = vr[0].shape[:2] if n else (0, 0)
    return n, float(vr.get_avg_fps()), w, h


def read_frames(path: str, indices: list[int], size: tuple[int, int] | None = None) -> Any:
    """uint8 (len(indices), h, w, 3) RGB frames by decord's frame index (no quirk handling; kept for
    comparisons and tests); `size` = (w, h) scales them with `resize_frame`, as `decode_clip` does."""
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    frames = vr.get_batch(indices).asnumpy()
    return resize_stack(frames, size) if size else frames


def pyav_reasons(p: Any) -> list[str]:
    """Why `p` (a VideoProbe) must be decoded with PyAV; empty when decord is right for it."""
    reasons = []
    if p.codec not in DECORD_CODECS:
        reasons.append(f"codec {p.codec}")
    if p.container not in DECORD_CONTAINERS:
        reasons.append(f"container {p.container}")
    if p.edit_list:
        reasons.append(f"edit list hides {p.discarded} pre-roll frame{'s' * (p.discarded != 1)}")
    if p.duration is None:
        reasons.append("no container duration")
    if p.rotation:  # decord 0.6 applies some rotations itself, before its resize: not ours to guess
        reasons.append(f"rotation {p.rotation}")
    if p.truncated:
        reasons.append("truncated")
    if p.first_frame_error:
        reasons.append("first frame does not decode")
    if len(p.display_pts) != p.packets - p.discarded:
        reasons.append("packets without distinct timestamps")
    return reasons


def storage_size(p: Any, width: int, height: int) -> tuple[int, int]:
    """(w, h) to scale the *stored* picture to so that, after the display rotation, it covers
    width x height with the displayed aspect ratio (SAR applied)."""
    cw, ch = cover_size(p.display_width, p.display_height, width, height)
    return (ch, cw) if p.rotation in (90, 270) else (cw, ch)


def orient(frames: Any, rotation: int) -> Any:
    """Rotate uint8 (F, h, w, 3) frames by the display matrix angle (degrees counter-clockwise, as
    `av_display_rotation_get` reports it; FFmpeg's autorotate shows the same picture)."""
    import numpy as np

    return np.ascontiguousarray(np.rot90(frames, k=rotation // 90, axes=(1, 2))) if rotation else frames


def _decode_decord(path: str, p: Any, idx: list[int], size: tuple[int, int]) -> Any:
    """decord read of display frames `idx` at the stored size, each then scaled to `size` = (w, h)
    by `resize_frame` (a few frames at a time, so no stack of full-size frames is held); None when
    decord's view of the file disagrees with the probe (frame count, or a taken frame's time offset
    from frame 0 off by more than a quarter of the shortest frame interval) or its output is
    malformed (decord 0.6 gives (h, w, 4) frames for some widths, e.g. 48)."""
    import decord
    import numpy as np

    src = av_input(path)  # a tar or Arrow member: a file object, which decord reads into memory
    try:
        vr = decord.VideoReader(src, num_threads=1)  # no width/height: decord's own scaler is bilinear
    finally:
        close_input(src)
    if len(vr) != len(p.display_pts):
        return None
    wanted = sorted(set(idx))
    ts = vr.get_frame_timestamp([0, *wanted])[:, 0]  # (1 + len, 2) start/end seconds, float32
    # decord counts time from the stream's start (MPEG-TS starts at ~1.4 s) and in float32, so compare
    # offsets from frame 0, to a quarter of the shortest frame interval: enough to catch a frame
    # misaligned by one, never tripped by float32 rounding on long clips.
    pts = p.display_pts
    shortest = min((b - a for a, b in zip(pts, pts[1:])), default=p.end_pts - pts[0])
    tol = max(float(p.time_base) / 2, 0.25 * p.seconds(shortest))
    for i, t in zip(wanted, ts[1:]):
        if abs(float(t - ts[0]) - p.seconds(p.display_pts[i] - p.display_pts[0])) > tol:
            return None
    out = np.empty((len(idx), size[1], size[0], 3), np.uint8)
    for start in range(0, len(idx), DECORD_CHUNK):
        chunk = vr.get_batch(idx[start : start + DECORD_CHUNK]).asnumpy()
        if chunk.shape[1:] != (p.height, p.width, 3):  # decord 0.6 returns 4 channels at some widths
            return None
        resize_stack(chunk, size, out, start)
    return out


def _decode_pyav(path: str, p: Any, idx: list[int], size: tuple[int, int]) -> Any:
    """Sequential PyAV decode (one thread) of display frames `idx`: each converted to RGB at its
    stored size (swscale, no scaling) and scaled to `size` = (w, h) by `resize_frame`, as decord's
    frames are. Stops at the first incomplete packet (truncated data): frames shown before it decode
    from intact packets only."""
    import av
    import numpy as np

    want = {p.display_pts[i] for i in idx}
    got: dict[int, Any] = {}
    errors: list[str] = []
    out = [0]  # frames output so far: the display index of a frame that carries no pts

    def take(frames: list[Any]) -> None:
        for fr in frames:
            n, out[0] = out[0], out[0] + 1
            pts = fr.pts if fr.pts is not None else p.display_pts[min(n, len(p.display_pts) - 1)]
            if pts in want and pts not in got:
                got[pts] = resize_frame(fr.to_ndarray(format="rgb24"), size)

    src = av_input(path)  # a tar or Arrow member: a file object over its bytes
    try:
        with av.open(src) as container:
            stream = container.streams.video[0]
            cc = stream.codec_context
            cc.thread_count = 1  # frame threads would make error concealment order-dependent
            for pkt in container.demux(stream):
                if pkt.size and pkt.is_corrupt:
                    break  # a partial packet: decode no further, flush what came before
                try:
                    take(cc.decode(pkt if pkt.size else None))
                except av.error.FFmpegError as exc:
                    errors.append(f"pts {pkt.pts}: {str(exc).splitlines()[0][:200]}")
                    if pkt.size == 0:
                        break
                if len(got) == len(want):
                    break
            if len(got) < len(want):
                try:
                    take(cc.decode(None))
                except av.error.FFmpegError as exc:
                    errors.append(f"flush: {str(exc).splitlines()[0][:200]}")
    finally:
        close_input(src)
    missing = sorted(want - set(got))
    if missing:
        first = missing[0]
        raise ClipFailure(
            "decode_error",
            f"frame {p.display_pts.index(first)} (pts {p.seconds(first):.3f} s) did not decode"
            + (f"; first decoder error at {errors[0]}" if errors else ""),
        )
    return np.stack([got[p.display_pts[i]] for i in idx])


def special_file_kind(path: str) -> str | None:
    """What `path` is when it is not a regular file ("a directory", "a named pipe (FIFO)", "a socket",
    "a device"), else None. Reads only the inode (`os.stat`), so it never blocks on a FIFO."""
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory (give the videos inside it)"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def plan_clip(path: str, policy: FramePolicy) -> tuple[Any, list[int], list[str]]:
    """Probe `path` and choose its frames: (VideoProbe, display indices, reasons to use PyAV).

    A truncated file is planned on its intact prefix (frames shown before the first lost packet);
    if that is too short the failure is `truncated`, naming what the probe saw."""
    from carv_attrib.video.probe import probe_video

    member = parse_member(path)  # a clip inside a tar shard or an Arrow file (`video.member`)
    if member is not None and member.offset is None:  # a tar sample with a caption and no video
        raise ClipFailure("missing", f"the sample has no video member: {describe(path)}")
    if not source_exists(path):
        raise ClipFailure("missing", f"file not found: {describe(path)}")
    special = special_file_kind(path if member is None else member.container)
    if special is not None:  # opened as a video it would fail obscurely (a directory) or block (a FIFO)
        raise ClipFailure("not_a_file", f"not a video file but {special}: {describe(path)}")
    if source_bytes_available(path) == 0:
        raise ClipFailure("decode_error", f"file is empty (0 bytes): {describe(path)}")
    p = probe_video(path)
    reasons = pyav_reasons(p)
    if p.truncated:
        limit = p.intact_before
        kept = [t for t in p.display_pts if limit is None or t < limit]
        if not kept:
            raise ClipFailure("truncated", f"the file ends early: {p.truncation}; no frame is intact")
        end = next((t for t in p.display_pts if t >= kept[-1] + 1), p.end_pts)
        if limit is not None:
            end = min(end, limit)
        p.display_pts, p.end_pts = kept, end
        try:
            idx = select_frames(p.display_pts, p.end_pts, p.time_base, policy)
        except ClipFailure as exc:
            raise ClipFailure(
                "truncated",
                f"the file ends early: {p.truncation}; the intact prefix is too short: {exc.message}",
                exc.details,
            ) from None
        return p, idx, reasons
    if not p.display_pts:
        raise ClipFailure(
            "decode_error", f"no video packets could be read ({p.first_frame_error or 'empty stream'})"
        )
    return p, select_frames(p.display_pts, p.end_pts, p.time_base, policy), reasons


def decode_clip(path: str, policy: FramePolicy, decoder: str = "auto") -> DecodedClip:
    """Decode one clip (see the module docstring); failures are ClipFailure(kind, message).

    decoder: "auto" (decord unless the probe finds a reason for PyAV), or "pyav" to force PyAV (for
    comparisons and `carv-attrib frames --decoder pyav`)."""
    import numpy as np

    if decoder not in ("auto", "pyav"):
        raise ValueError(f"decoder must be 'auto' or 'pyav', not {decoder!r}")
    p, idx, reasons = plan_clip(path, policy)
    size = storage_size(p, policy.width, policy.height)
    frames = None
    if decoder == "pyav":
        reasons = ["asked for"]
    decoder = "pyav"
    if not reasons:
        try:
            frames = _decode_decord(path, p, idx, size)  # (F, h, w, 3)
        except Exception as exc:  # decord raises DECORDError / RuntimeError; PyAV below decides
            reasons = [f"decord failed: {type(exc).__name__}"]
        else:
            if frames is None:
                reasons = ["decord's frame count or timestamps disagree with the container"]
            else:
                decoder = "decord"
    if frames is None:
        try:
            frames = _decode_pyav(path, p, idx, size)
        except ClipFailure:
            raise
        except Exception as exc:  # av errors outside a packet decode (open, demux)
            raise ClipFailure(
                "decode_error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    if frames.shape[0] != policy.frames:
        raise ClipFailure("decode_error", f"decoder returned {frames.shape[0]} of {policy.frames} frames")
    frames = orient(frames, p.rotation)
    top = (frames.shape[1] - policy.height) // 2
    left = (frames.shape[2] - policy.width) // 2
    frames = np.ascontiguousarray(frames[:, top : top + policy.height, left : left + policy.width])
    shown = float((p.end_pts - p.display_pts[0]) * p.time_base)
    return DecodedClip(
        frames=frames,
        indices=idx,
        source_fps=len(p.display_pts) / shown if shown > 0 else 0.0,
        source_frames=len(p.display_pts),
        decoder=decoder,
        timestamps=[p.seconds(p.display_pts[i] - p.display_pts[0]) for i in idx],
        start=p.seconds(p.display_pts[0]),
        reasons=reasons,
        padded=frames_past_end(p.display_pts, p.end_pts, p.time_base, policy),
    )


def frames_to_tensor(frames: Any) -> Any:
    """uint8 (F, H, W, 3) → float32 (3, F, H, W) in [-1, 1], the VAE's input layout."""
    import torch

    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # (3, F, H, W)
    return x / 127.5 - 1.0
