"""What a clip's frames are under a frame policy: the library side of `carv-attrib frames VIDEO`.

    report = inspect_frames("clip.mp4", FramePolicy(frames=17, height=64, width=64, fps=8))
    report["frames"]   # [{"k", "target", "index", "timestamp"}, ...]
    report["probe"]    # codec, rates, vfr, edit_list, rotation, sar, duration, ...
    contact_sheet(inspect_frames(..., with_frames=True)["pixels"], "sheet.png")

Neither function imports torch; both run on the CPU in a fraction of a second for short clips.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from carv_attrib.errors import UsageError
from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip, special_file_kind


def inspect_frames(
    path: str | Path, policy: FramePolicy, decoder: str = "auto", with_frames: bool = False
) -> dict[str, Any]:
    """Probe and decode one clip as `encode`/`score` would; never raises for a bad clip.

    Returns a JSON-ready dict (except "pixels"):
    - path (str), policy (FramePolicy.to_dict()), status ("ok" or a ClipFailure kind), error (the
      failure message or None), details (ClipFailure.details, e.g. too_short's available/needed);
    - decoder ("decord" | "pyav" | None), reasons (why PyAV was used; list[str]);
    - frames: one dict per output frame k: target (seconds after the first displayed frame the
      policy asks for: k/fps; None for fps 0), index (display-order source frame number, 0 = first
      displayed frame), timestamp (that frame's presentation time in seconds after the first
      displayed frame; compare with target); start (the first displayed frame's pts, seconds);
    - probe: VideoProbe.facts() (container, codec, decoder, width/height stored, display_width/
      display_height, sar "n:d", rotation degrees counter-clockwise, time_base, avg_rate frames/s,
      duration s or None, header_frames, packets, discarded, display_frames, start/end s,
      edit_list, vfr, truncated, truncation, first_frame_error), or None when probing failed;
    - pixels (only with with_frames=True and status ok): uint8 numpy (F, H, W, 3) RGB, the frames
      the VAE would get.
    `decoder="pyav"` forces PyAV (to compare with the automatic choice).

    Raises UsageError (exit 2) when `path` exists but is not a regular file (a directory, FIFO,
    socket or device): it is one path the user named, not a clip among many, and probing it would
    block on a FIFO for ever; the inode alone tells (`special_file_kind`).
    """
    from carv_attrib.video.probe import probe_video

    path = str(path)
    special = special_file_kind(path) if os.path.exists(path) else None
    if special is not None:
        raise UsageError(f"{path} is not a video file but {special}; give a video file")
    report: dict[str, Any] = {
        "path": path,
        "policy": policy.to_dict(),
        "status": "ok",
        "error": None,
        "details": {},
        "decoder": None,
        "reasons": [],
        "frames": [],
        "start": None,
        "probe": None,
    }
    try:
        report["probe"] = probe_video(path).facts()
    except ClipFailure:
        pass  # decode_clip below reports the same failure, with its kind
    except FileNotFoundError:
        pass
    try:
        clip = decode_clip(path, policy, decoder)
    except ClipFailure as exc:
        report.update(status=exc.kind, error=exc.message, details=dict(exc.details))
        return report
    report.update(decoder=clip.decoder, reasons=list(clip.reasons), start=clip.start)
    report["frames"] = [
        {
            "k": k,
            "target": (k / policy.fps) if policy.fps else None,
            "index": i,
            "timestamp": t,
        }
        for k, (i, t) in enumerate(zip(clip.indices, clip.timestamps))
    ]
    if with_frames:
        report["pixels"] = clip.frames
    return report


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_png(image: Any, path: str | Path) -> Path:
    """Write uint8 (H, W, 3) RGB as an 8-bit truecolour PNG (PNG spec, ISO/IEC 15948: IHDR, one
    zlib IDAT with filter type 0 on every row, IEND). No imaging library needed."""
    import numpy as np

    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got shape {img.shape}")
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def contact_sheet(frames: Any, path_png: str | Path, columns: int = 0, gap: int = 2, scale: int = 1) -> Path:
    """Tile uint8 (F, H, W, 3) frames row by row into one PNG, frame k at row k // columns.

    columns: frames per row (0 = ceil(sqrt(F))); gap: pixels of black between tiles; scale: integer
    nearest-neighbour magnification (64x64 training frames are small on screen). Returns the path.
    The sheet is (rows*(H*scale+gap)-gap) x (columns*(W*scale+gap)-gap) pixels."""
    import numpy as np

    x = np.asarray(frames, dtype=np.uint8)
    if x.ndim != 4 or x.shape[3] != 3 or x.shape[0] == 0:
        raise ValueError(f"expected (F, H, W, 3) uint8 frames, got shape {x.shape}")
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    f, h, w, _ = x.shape
    cols = columns or math.ceil(math.sqrt(f))
    rows = math.ceil(f / cols)
    sheet = np.zeros((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), np.uint8)
    for k in range(f):
        r, c = divmod(k, cols)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = x[k]
    return write_png(sheet, path_png)
