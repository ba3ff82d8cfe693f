"""Decode clips with decord into fixed-size frame stacks for the Wan VAE.

Frame policy (defaults are demo scale; Wan2.1-T2V itself is trained at 81 frames, 480x832, 16 fps):
- F = `frames` (default 17) frames, F = 1 + 4k because the VAE encodes the first frame and then
  chunks of 4 and silently drops a remainder;
- sampled at `fps` (default 8): frame k is the source frame nearest to time k/fps, from the start
  of the clip (`fps=0` takes consecutive source frames);
- resized so the frame covers H x W (the shorter side relative to the target aspect) and
  centre-cropped to H x W (default 64x64); H, W multiples of 16 (8x VAE x 2x patch) because the
  transformer crops odd latent sizes silently;
- a clip with fewer frames than needed is a `too_short` failure, unless `pad_short` repeats its
  last frame.

    policy = FramePolicy(frames=17, height=64, width=64, fps=8)
    clip = decode_clip("videos/v1.mp4", policy)   # clip.frames: uint8 (F, H, W, 3)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from carv_attrib.errors import UsageError


class ClipFailure(Exception):
    """A per-clip failure that is recorded in the output (status=kind), never raised to the user."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # crosses process boundaries intact
        return (ClipFailure, (self.kind, self.message))


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


def frame_indices(num_source: int, source_fps: float, policy: FramePolicy) -> list[int]:
    """Source frame indices for the F output frames (raises ClipFailure too_short)."""
    step = 1.0 if policy.fps == 0 or source_fps <= 0 else source_fps / policy.fps
    idx = [int(k * step + 0.5) for k in range(policy.frames)]
    if idx[-1] >= num_source:
        if not policy.pad_short or num_source == 0:
            seconds = (policy.frames - 1) / policy.fps if policy.fps else policy.frames
            raise ClipFailure(
                "too_short",
                f"clip has {num_source} frames at {source_fps:.2f} fps; {policy.frames} frames at "
                f"{policy.fps:g} fps need {idx[-1] + 1} ({seconds:.2f} s); pass --pad-short to repeat the last frame",
            )
        idx = [min(i, num_source - 1) for i in idx]
    return idx


def cover_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """Smallest (w, h) with the source aspect ratio that covers width x height."""
    scale = max(width / src_w, height / src_h)
    return max(width, round(src_w * scale)), max(height, round(src_h * scale))


@dataclass
class DecodedClip:
    frames: Any  # uint8 numpy (F, H, W, 3)
    indices: list[int]
    source_fps: float
    source_frames: int


def probe(path: str) -> tuple[int, float, int, int]:
    """(frame count, average fps, width, height) of a video, via decord."""
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    h, w = vr[0].shape[:2] if n else (0, 0)
    return n, float(vr.get_avg_fps()), w, h


def read_frames(path: str, indices: list[int], size: tuple[int, int] | None = None) -> Any:
    """uint8 (len(indices), h, w, 3) RGB frames; `size` = (w, h) resizes inside the decoder
    (ffmpeg's scaler), so full-size frames never cross process boundaries."""
    import decord

    kwargs = {"width": size[0], "height": size[1]} if size else {}
    vr = decord.VideoReader(path, num_threads=1, **kwargs)
    return vr.get_batch(indices).asnumpy()


def decode_clip(path: str, policy: FramePolicy) -> DecodedClip:
    """Decode one clip with decord; failures are ClipFailure(kind, message)."""
    import numpy as np

    if not os.path.exists(path):
        raise ClipFailure("missing", f"file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ClipFailure("decode_error", f"file is empty (0 bytes): {path}")
    try:
        n, fps, src_w, src_h = probe(path)
        idx = frame_indices(n, fps, policy)
        frames = read_frames(path, idx, cover_size(src_w, src_h, policy.width, policy.height))  # (F, h, w, 3)
    except ClipFailure:
        raise
    except Exception as exc:  # decord raises DECORDError / RuntimeError on corrupt input
        raise ClipFailure("decode_error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    if frames.shape[0] != policy.frames:
        raise ClipFailure("decode_error", f"decoder returned {frames.shape[0]} of {policy.frames} frames")
    top = (frames.shape[1] - policy.height) // 2
    left = (frames.shape[2] - policy.width) // 2
    frames = np.ascontiguousarray(frames[:, top : top + policy.height, left : left + policy.width])
    return DecodedClip(frames=frames, indices=idx, source_fps=fps, source_frames=n)


def frames_to_tensor(frames: Any) -> Any:
    """uint8 (F, H, W, 3) → float32 (3, F, H, W) in [-1, 1], the VAE's input layout."""
    import torch

    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # (3, F, H, W)
    return x / 127.5 - 1.0
