"""Conformance corpus: each kind of real-world quirk, several instances, built at test time with the
ffmpeg binary from `imageio-ffmpeg`, checked against what ffmpeg itself shows (`corpus.reference`).

For every clip that decodes, frame k must be the frame ffmpeg displays at k/fps after its first
frame (frame numbers read exactly from luma, see corpus.py), the recorded timestamps must be
ffmpeg's pts for those frames, the orientation marker must sit in the corner ffmpeg puts it, and the
decoder must be the one the probe should pick. Geometry: the centre region is the middle third of
the *displayed* picture, so its extent in the output checks SAR and rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.video.decode import ClipFailure, DecodedClip, FramePolicy, decode_clip
from carv_attrib.video.probe import probe_video
from tests.video.corpus import STEP, ffmpeg_exe, make, read_number, reference, run, to_luma

FF = ffmpeg_exe()
pytestmark = pytest.mark.skipif(FF is None, reason="imageio-ffmpeg is not installed (pip install .[test])")


@dataclass
class Case:
    kind: str
    build: Callable[[str, Path], Path]
    policy: FramePolicy
    decoder: str | None = "decord"  # expected decoder when it decodes; None: a failure is expected
    failure: str | None = None  # expected ClipFailure kind
    notes: dict = field(default_factory=dict)


def _cfr(rate: str, count: int, **kw) -> Callable[[str, Path], Path]:
    return lambda ff, d: make(ff, d / "clip.mp4", count, rate, **kw)


def _cut(rate: str, count: int, at: float, ext: str = "mp4") -> Callable[[str, Path], Path]:
    def build(ff: str, d: Path) -> Path:
        src = make(ff, d / "src.mp4", count, rate)
        out = d / f"cut.{ext}"
        run(ff, ["-ss", str(at), "-i", str(src), "-c", "copy", str(out)])  # the usual fast scene cut
        return out

    return build


def _vfr(expr: str, count: int, ext: str = "mp4") -> Callable[[str, Path], Path]:
    """Frames 0..count-1 re-timed by a setpts expression (seconds), kept as they are (passthrough)."""
    # Input "rate" 600 only gives the encoder a 1/600 s time base, so no two frames round to one tick.
    extra = ["-vf", f"setpts='({expr})/TB'", "-fps_mode", "passthrough"]
    fmt = ["-video_track_timescale", "600"] if ext == "mp4" else []
    return lambda ff, d: make(ff, d / f"vfr.{ext}", count, "600", extra=extra, fmt=fmt)


def _live(enc: list[str], fmt: str, ext: str) -> Callable[[str, Path], Path]:
    """Written to a pipe, as a live recorder does: no duration, no cues."""

    def build(ff: str, d: Path) -> Path:
        out = d / f"live.{ext}"
        src = make(ff, d / "src.mp4", 24, "8")
        out.write_bytes(run(ff, ["-i", str(src), *enc, "-f", fmt, "pipe:1"]))
        return out

    return build


def _rotated(angle: int) -> Callable[[str, Path], Path]:
    def build(ff: str, d: Path) -> Path:
        src = make(ff, d / "src.mp4", 40, "30")
        out = d / f"rot{angle}.mp4"
        run(ff, ["-display_rotation", str(angle), "-i", str(src), "-c", "copy", str(out)])
        return out

    return build


def _sar(sar: str, size: tuple[int, int]) -> Callable[[str, Path], Path]:
    return lambda ff, d: make(ff, d / "sar.mp4", 40, "30", size=size, extra=["-vf", f"setsar={sar}"])


def _truncated(fraction: float, faststart: bool) -> Callable[[str, Path], Path]:
    def build(ff: str, d: Path) -> Path:
        fmt = ["-movflags", "+faststart"] if faststart else []
        src = make(ff, d / "src.mp4", 48, "8", fmt=fmt)
        data = src.read_bytes()
        out = d / "truncated.mp4"
        out.write_bytes(data[: int(len(data) * fraction)])  # an interrupted copy
        return out

    return build


def _audio(codec: str, ext: str) -> Callable[[str, Path], Path]:
    def build(ff: str, d: Path) -> Path:
        out = d / f"audio.{ext}"
        run(ff, ["-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", codec, str(out)])
        return out

    return build


def _unknown_codec(tag: bytes, ext: str, enc: list[str] | None = None) -> Callable[[str, Path], Path]:
    """A valid file whose video sample entry is renamed to a fourcc no FFmpeg decoder maps."""

    def build(ff: str, d: Path) -> Path:
        data = make(ff, d / f"src.{ext}", 20, "30", enc=enc).read_bytes()
        st = data.index(b"stsd")
        entry = st + 16  # stsd: type, version/flags, entry_count, then the entry's size and type
        out = d / f"unknown.{ext}"
        out.write_bytes(data[:entry] + tag + data[entry + 4 :])
        return out

    return build


P96x64 = FramePolicy(frames=9, height=64, width=96, fps=8)
CASES: dict[str, Case] = {
    # constant frame rate controls, decord's fast path
    "cfr-30": Case("control", _cfr("30", 60), P96x64),
    "cfr-25": Case("control", _cfr("25", 50), P96x64),
    "cfr-ntsc": Case("control", _cfr("30000/1001", 60), P96x64),
    "cfr-10": Case("control", _cfr("10", 20), P96x64),
    "cfr-30-consecutive": Case("control", _cfr("30", 20), FramePolicy(9, 64, 96, fps=0)),
    "cfr-24-at-5fps": Case("control", _cfr("24", 60), FramePolicy(9, 64, 96, fps=5)),
    "cfr-mpegts": Case(
        "mpegts", lambda ff, d: make(ff, d / "clip.ts", 60, "30"), P96x64, "pyav"
    ),  # from 1.4 s
    "cfr-mkv": Case("control", lambda ff, d: make(ff, d / "clip.mkv", 60, "30"), P96x64),  # 1 ms ticks: 33/34
    "cfr-avi-mpeg4": Case(
        "control",
        lambda ff, d: make(ff, d / "clip.avi", 60, "25", enc=["-c:v", "mpeg4", "-q:v", "2"]),
        P96x64,
    ),
    # stream-copied cuts: an MP4 edit list hides the pre-roll from the previous keyframe
    "cut-30-at-1.5": Case("edit_list", _cut("30", 120, 1.5), P96x64, "pyav"),
    "cut-30-at-0.7": Case("edit_list", _cut("30", 120, 0.7), P96x64, "pyav"),
    "cut-30-at-2.2": Case("edit_list", _cut("30", 120, 2.2), FramePolicy(9, 64, 96, fps=0), "pyav"),
    "cut-25-at-1.3": Case("edit_list", _cut("25", 100, 1.3), P96x64, "pyav"),
    "cut-30-at-1.5-mov": Case("edit_list", _cut("30", 120, 1.5, "mov"), P96x64, "pyav"),
    # variable frame rate
    "vfr-30-then-2": Case("vfr", _vfr("if(lt(N,30),N/30,1+(N-30)/2)", 40), FramePolicy(17, 64, 96, 8)),
    "vfr-5-then-60": Case("vfr", _vfr("if(lt(N,5),N/5,1+(N-5)/60)", 60), P96x64),
    "vfr-jitter": Case("vfr", _vfr("N/25+0.01*mod(N*7,3)", 50), P96x64),
    "vfr-mkv": Case("vfr", _vfr("if(lt(N,30),N/30,1+(N-30)/2)", 40, "mkv"), P96x64),
    # live recordings: no duration, no cues
    "live-vp9-webm": Case(
        "no_duration",
        _live(
            ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "10", "-b:v", "0"],
            "webm",
            "webm",
        ),
        P96x64,
        "pyav",
    ),
    "live-h264-mkv": Case(
        "no_duration", _live(["-c:v", "libx264", "-crf", "10"], "matroska", "mkv"), P96x64, "pyav"
    ),
    # rotation metadata (display matrix, degrees counter-clockwise)
    "rotate-90": Case("rotation", _rotated(90), FramePolicy(9, 96, 64, 8), "pyav"),
    "rotate-180": Case("rotation", _rotated(180), P96x64, "pyav"),
    "rotate-270": Case("rotation", _rotated(270), FramePolicy(9, 96, 64, 8), "pyav"),
    "rotate-minus-90": Case("rotation", _rotated(-90), FramePolicy(9, 96, 64, 8), "pyav"),
    # non-square pixels: displayed W*SAR x H
    # decord 0.6 reads pictures 16, 24, 48 or 72 pixels wide as 4-channel and fails ("size must exactly
    # match"); both decoders hand over stored-size frames, so such a clip goes to PyAV, same pixels.
    "sar-2:1": Case("sar", _sar("2/1", (48, 64)), P96x64, "pyav"),  # stored 48 wide: decord bug
    "sar-1:2": Case("sar", _sar("1/2", (128, 64)), FramePolicy(9, 64, 64, 8)),
    "sar-1:2-width-48": Case("sar", _sar("1/2", (96, 64)), FramePolicy(9, 64, 48, 8)),
    "sar-4:3": Case("sar", _sar("4/3", (72, 64)), P96x64, "pyav"),  # stored 72 wide: decord bug
    # codecs: decord's (mpeg4, hevc, vp9) and one it cannot read (AV1: PyAV decodes it with dav1d)
    "codec-mpeg4": Case("codec", _cfr("30", 40, enc=["-c:v", "mpeg4", "-q:v", "2"]), P96x64),
    "codec-hevc": Case(
        "codec",
        _cfr("30", 40, enc=["-c:v", "libx265", "-crf", "10", "-x265-params", "log-level=none"]),
        P96x64,
    ),
    "codec-vp9-mp4": Case(
        "codec",
        _cfr(
            "30",
            40,
            enc=["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "10", "-b:v", "0"],
        ),
        P96x64,
    ),
    "codec-av1": Case(
        "codec", _cfr("30", 40, enc=["-c:v", "libsvtav1", "-crf", "20", "-preset", "12"]), P96x64, "pyav"
    ),
    # codecs no decoder in PyAV's FFmpeg maps: a failure that names the codec tag
    "unknown-fourcc-mp4": Case("codec", _unknown_codec(b"zzzz", "mp4"), P96x64, None, "unsupported_codec"),
    "unknown-fourcc-mov-hevc": Case(
        "codec",
        _unknown_codec(b"qv01", "mov", ["-c:v", "libx265", "-x265-params", "log-level=none"]),
        P96x64,
        None,
        "unsupported_codec",
    ),
    # truncated copies: the intact prefix when it is long enough, else a truncated failure
    "trunc-40-short-policy": Case("truncated", _truncated(0.4, True), FramePolicy(5, 64, 96, 8), "pyav"),
    "trunc-40-long-policy": Case(
        "truncated", _truncated(0.4, True), FramePolicy(33, 64, 96, 8), None, "truncated"
    ),
    "trunc-70": Case("truncated", _truncated(0.7, True), FramePolicy(17, 64, 96, 8), "pyav"),
    "trunc-moov-at-end": Case("truncated", _truncated(0.6, False), P96x64, None, "truncated"),
    # no video stream
    "audio-aac-mp4": Case("no_video", _audio("aac", "mp4"), P96x64, None, "no_video"),
    "audio-opus-webm": Case("no_video", _audio("libopus", "webm"), P96x64, None, "no_video"),
    "audio-pcm-mkv": Case("no_video", _audio("pcm_s16le", "mkv"), P96x64, None, "no_video"),
    # too short
    "short-1-frame": Case("too_short", _cfr("8", 1), P96x64, None, "too_short"),
    "short-5-at-30": Case("too_short", _cfr("30", 5), P96x64, None, "too_short"),
    "short-5-consecutive": Case("too_short", _cfr("30", 5), FramePolicy(9, 64, 96, fps=0), None, "too_short"),
    "short-5-padded": Case("too_short", _cfr("30", 5), FramePolicy(9, 64, 96, 8, pad_short=True)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            d = tmp_path_factory.mktemp(name.replace(":", "_"))
            cache[name] = CASES[name].build(FF, d)
        return cache[name]

    return get


def expected_frames(ref, policy: FramePolicy) -> list[int]:
    """Reference frame indices the policy should take, from ffmpeg's timestamps (pad_short repeats the
    last frame for targets past the end)."""
    if policy.fps == 0:
        return [min(k, len(ref.pts) - 1) for k in range(policy.frames)]
    rate = Fraction(repr(float(policy.fps)))
    return [ref.shown_at(Fraction(k) / rate) for k in range(policy.frames)]


def centre_extent(clip: DecodedClip) -> tuple[float, float]:
    """Fraction of the output height and width covered by the centre region (frame with hi != lo)."""
    for img in clip.frames:
        y = to_luma(img)
        h, w = y.shape
        hi = y[h // 2, w // 2]
        lo = np.median([y[h // 16, w // 2], y[h - 1 - h // 16, w // 2], y[h // 2, w // 16]])
        if abs(hi - lo) >= 2 * STEP:
            inside = np.abs(y - hi) < STEP / 2
            return inside[:, w // 2].mean(), inside[h // 2, :].mean()
    raise AssertionError("no frame with distinct centre and surround")


FACT = {
    "edit_list": lambda p: p.edit_list and p.discarded > 0,
    "vfr": lambda p: p.vfr,
    "no_duration": lambda p: p.duration is None,
    "rotation": lambda p: p.rotation in (90, 180, 270),
    "sar": lambda p: p.sar != 1,
    "control": lambda p: not (p.edit_list or p.vfr or p.rotation or p.truncated) and p.sar == 1,
    "mpegts": lambda p: p.container == "mpegts" and p.display_pts[0] > 0,
}


def check(name: str, path: Path, decoder: str = "auto") -> dict:
    case = CASES[name]
    if case.kind in FACT:  # the probe sees the quirk the case was built to have
        assert FACT[case.kind](probe_video(str(path))), name
    try:
        clip = decode_clip(str(path), case.policy, decoder)
    except ClipFailure as exc:
        assert case.failure == exc.kind, f"{name}: {exc.kind}: {exc.message}"
        if exc.kind == "truncated":
            assert exc.message.startswith("the file ends early: ")
        if exc.kind == "unsupported_codec":  # named
            assert path.read_bytes()[path.read_bytes().index(b"stsd") + 16 :][:4].decode() in exc.message
        if exc.kind == "too_short":
            assert "--" not in exc.message and exc.details["needed_frames"] == case.policy.frames
        return {"case": name, "kind": case.kind, "result": exc.kind, "message": exc.message}
    assert case.failure is None, f"{name}: expected {case.failure}, decoded with {clip.decoder}"
    if decoder == "auto":
        assert clip.decoder == case.decoder, (name, clip.reasons)
    assert clip.frames.shape == (case.policy.frames, case.policy.height, case.policy.width, 3)
    if case.kind == "truncated":  # the reference is ffmpeg on the whole file, before the cut
        ref = reference(FF, path.parent / "src.mp4")
    else:
        ref = reference(FF, path)
    want = expected_frames(ref, case.policy)
    ours = [read_number(img) for img in clip.frames]
    assert [n for n, _ in ours] == [ref.numbers[i] for i in want], name
    assert [m for _, m in ours] == [ref.marks[i] for i in want], f"{name}: orientation"
    rel = [float((ref.pts[i] - ref.pts[0]) * ref.time_base) for i in want]
    assert clip.timestamps == pytest.approx(rel, abs=1e-9)
    tall, wide = centre_extent(clip)
    # The middle third of the displayed picture; +-2 px of bicubic blur at each edge.
    assert abs(tall - 1 / 3) <= 4 / case.policy.height and abs(wide - 1 / 3) <= 4 / case.policy.width, name
    return {
        "case": name,
        "kind": case.kind,
        "result": "ok",
        "decoder": clip.decoder,
        "taken": [round(t, 4) for t in clip.timestamps],
        "numbers": [n for n, _ in ours],
    }


@pytest.mark.parametrize("name", list(CASES))
def test_conformance(name: str, built: Callable[[str], Path]) -> None:
    check(name, built(name))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.decoder == "decord" and c.failure is None])
def test_pyav_path_agrees_on_decord_cases(name: str, built: Callable[[str], Path]) -> None:
    """The PyAV path, forced, takes the same frames as decord where decord is used."""
    check(name, built(name), decoder="pyav")
