"""Synthetic demo data: real H.264 mp4 clips of moving shapes with matching captions.

    make_demo_data("demo/data", clips=24)
    # demo/data/videos/<vid>.mp4, demo/data/manifest.json (VidGen-1M style [{"vid", "caption"}])

Each clip shows one coloured shape moving in one direction over a plain background, and its caption
says so ("a red square moving left over a grey background"), so clips that share words also share
visual content: attribution on the demo has a ground truth a person can check by eye.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from carv_attrib.store.shards import atomic_path

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"grey": (128, 128, 128), "black": (12, 12, 12)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class ClipSpec:
    vid: str
    color: str
    shape: str
    direction: str
    background: str
    size: int  # shape radius in pixels
    start: tuple[int, int]

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"  # "an orange circle", not "a orange"
        return (
            f"{article} {self.color} {self.shape} moving {self.direction} over a {self.background} background"
        )


def _mask(shape: str, h: int, w: int, cx: float, cy: float, r: int) -> Any:
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    # triangle pointing up: inside if below the two slanted edges and above the base
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)


def render_frames(spec: ClipSpec, frames: int, width: int, height: int, speed: float) -> Any:
    """uint8 (frames, height, width, 3) of the shape moving `speed` px per frame."""

    bg = np.array(BACKGROUNDS[spec.background], np.uint8)
    fg = np.array(COLORS[spec.color], np.uint8)
    vx, vy = DIRECTIONS[spec.direction]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        cx = spec.start[0] + vx * speed * t
        cy = spec.start[1] + vy * speed * t
        img = np.broadcast_to(bg, (height, width, 3)).copy()
        img[_mask(spec.shape, height, width, cx, cy, spec.size)] = fg
        out[t] = img
    return out


def write_mp4(path: Path, frames: Any, fps: float) -> None:
    """H.264 (libx264, yuv420p) via PyAV; written to a temp name then renamed."""

    h, w = frames.shape[1:3]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=round(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "18", "preset": "veryfast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def clip_specs(n: int, seed: int = 0, width: int = 96, height: int = 80) -> list[ClipSpec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        direction = rng.choice(list(DIRECTIONS))
        size = rng.randint(max(4, height // 10), max(6, height // 5))
        # start on the side the shape moves away from, so it stays in view for most of the clip
        vx, vy = DIRECTIONS[direction]
        cx = width * (0.75 if vx < 0 else 0.25 if vx > 0 else rng.uniform(0.3, 0.7))
        cy = height * (0.75 if vy < 0 else 0.25 if vy > 0 else rng.uniform(0.3, 0.7))
        specs.append(
            ClipSpec(
                vid=f"demo-{i:05d}",
                color=rng.choice(list(COLORS)),
                shape=rng.choice(SHAPES),
                direction=direction,
                background=rng.choice(list(BACKGROUNDS)),
                size=size,
                start=(round(cx), round(cy)),
            )
        )
    return specs


def make_demo_data(
    out_dir: str | Path,
    clips: int = 24,
    seed: int = 0,
    frames: int = 24,
    width: int = 96,
    height: int = 80,
    fps: float = 8.0,
) -> Path:
    """Write `clips` mp4 files and a VidGen-style manifest; returns the manifest path.

    Clips are 3 s at 8 fps by default, larger than the default 64x64 encode size and not square, so
    the demo exercises resizing and centre-cropping.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    specs = clip_specs(clips, seed, width, height)
    speed = 0.5 * min(width, height) / frames
    for spec in specs:
        path = out / "videos" / f"{spec.vid}.mp4"
        if not path.exists():
            write_mp4(path, render_frames(spec, frames, width, height, speed), fps)
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps([{"vid": s.vid, "caption": s.caption} for s in specs], indent=1) + "\n")
    return manifest
