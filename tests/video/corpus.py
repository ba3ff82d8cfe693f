"""Build numbered test videos with the ffmpeg binary from the `imageio-ffmpeg` wheel, and decode
them with ffmpeg as the reference player.

Every frame carries its number N in luma (Y, limited range; chroma neutral):
- the centre third of the picture (both axes) has Y = 16 + 12 * (N // 16),
- the rest has Y = 16 + 12 * (N % 16),
- a marker block (the top-left sixth of the *stored* picture, both axes) has Y = 235, so the
  corner it lands in after rotation shows the orientation.
Levels are 12 apart, so a reading is exact while the decoded value is within +-6 of the coded one
(the quantisation margin: flat areas at CRF 10 come back within 1-2 levels). N <= 159.

RGB frames are read back through Y = 16 + RGB * 219 / 255 (grey pixels: R = G = B, BT.601 limited
range as FFmpeg converts them); ffmpeg's `-pix_fmt gray` output is full range the same way.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

STEP = 12
MARK = 235


def ffmpeg_exe() -> str | None:
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    return imageio_ffmpeg.get_ffmpeg_exe()


def luma_frame(n: int, w: int, h: int) -> np.ndarray:
    """Y plane (h, w) uint8 of frame number n."""
    y = np.full((h, w), 16 + STEP * (n % 16), np.uint8)
    y[h // 3 : h - h // 3, w // 3 : w - w // 3] = 16 + STEP * (n // 16)
    y[: h // 6, : w // 6] = MARK
    return y


def yuv420_stream(count: int, w: int, h: int, first: int = 0) -> bytes:
    chroma = np.full((h // 2) * (w // 2), 128, np.uint8).tobytes()
    return b"".join(luma_frame(first + i, w, h).tobytes() + chroma + chroma for i in range(count))


def run(ff: str, args: list[str], stdin: bytes | None = None) -> bytes:
    r = subprocess.run(
        [ff, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    if r.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout


# x264 with B-frames (reordered pts, as its defaults produce) and a 1 s GOP, quick and near-lossless
# on flat areas.
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "10", "-bf", "2", "-g", "30"]


def make(
    ff: str,
    out: Path,
    count: int,
    rate: str = "30",
    size: tuple[int, int] = (96, 64),
    enc: list[str] | None = None,
    extra: list[str] | None = None,
    fmt: list[str] | None = None,
) -> Path:
    """Encode frames 0..count-1 at `rate` (an ffmpeg rate string, e.g. "30000/1001") to `out`."""
    w, h = size
    args = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{w}x{h}", "-r", rate, "-i", "-"]
    enc = X264 if enc is None else enc
    args += (extra or []) + enc + ["-pix_fmt", "yuv420p"] + (fmt or []) + [str(out)]
    run(ff, args, yuv420_stream(count, w, h))
    return out


def to_luma(rgb_or_gray: np.ndarray) -> np.ndarray:
    """Full-range grey / RGB (h, w[, 3]) -> limited-range Y as float (h, w)."""
    x = rgb_or_gray.astype(np.float64)
    if x.ndim == 3:
        x = x.mean(axis=2)
    return 16 + x * 219 / 255


def read_number(img: np.ndarray) -> tuple[int, int]:
    """(N, marker corner 0..3 = TL, TR, BL, BR) of one frame (RGB or grey, full range), whatever its
    size: patches well inside the regions survive scaling (bicubic blur reaches ~2 px)."""
    y = to_luma(img)
    h, w = y.shape
    ch, cw = max(1, h // 16), max(1, w // 16)
    hi = y[h // 2 - ch : h // 2 + ch, w // 2 - cw : w // 2 + cw].mean()
    r0, r1, c0, c1 = h // 24, max(h // 24 + 1, h // 12), w // 24, max(w // 24 + 1, w // 12)
    corners = [
        y[r0:r1, c0:c1].mean(),
        y[r0:r1, w - c1 : w - c0].mean(),
        y[h - r1 : h - r0, c0:c1].mean(),
        y[h - r1 : h - r0, w - c1 : w - c0].mean(),
    ]
    mark = int(np.argmax(corners))
    lo = float(np.median([c for i, c in enumerate(corners) if i != mark]))
    return int(round((hi - 16) / STEP)) * 16 + int(round((lo - 16) / STEP)), mark


@dataclass
class Reference:
    """What ffmpeg (the CLI, default display behaviour: edit lists applied, autorotate on) shows."""

    pts: list[int]
    time_base: Fraction
    numbers: list[int]
    marks: list[int]
    sizes: list[tuple[int, int]]  # (w, h) after autorotation; SAR is metadata, not applied

    def shown_at(self, seconds: Fraction) -> int:
        """Index of the frame displayed at `seconds` after the first one (last pts <= t0 + seconds)."""
        limit = self.pts[0] + seconds / self.time_base
        return max(i for i, p in enumerate(self.pts) if p <= limit)


_FRAME = re.compile(r"n:\s*(\d+)\s+pts:\s*(-?\d+).*?\bs:(\d+)x(\d+)")
_TB = re.compile(r"config in time_base:\s*(\d+)/(\d+)")


def reference(ff: str, path: Path) -> Reference:
    """Every frame ffmpeg outputs for `path` (passthrough: no frame dropped or duplicated), with the
    pts and time base its showinfo filter prints."""
    r = subprocess.run(
        [ff, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
        + ["-vf", "showinfo", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
        capture_output=True,
        timeout=60,
    )
    err = r.stderr.decode(errors="replace")
    tb = _TB.search(err)
    if r.returncode or tb is None:
        raise RuntimeError(f"reference decode of {path} failed: {err[-500:]}")
    frames = _FRAME.findall(err)
    data = memoryview(r.stdout)
    pts, numbers, marks, sizes = [], [], [], []
    off = 0
    for _, p, w, h in frames:
        w, h = int(w), int(h)
        img = np.frombuffer(data[off : off + w * h], np.uint8).reshape(h, w)
        off += w * h
        n, m = read_number(img)
        pts.append(int(p))
        numbers.append(n)
        marks.append(m)
        sizes.append((w, h))
    return Reference(pts, Fraction(int(tb.group(1)), int(tb.group(2))), numbers, marks, sizes)
