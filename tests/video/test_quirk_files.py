"""The crafted files in shared/cases/video-quirks/ (README there) against their stated truth.

The folder sits next to the repository (../shared/cases/video-quirks from the repo root); the tests
skip when it is absent. Frame numbers are read from the raw Y plane of a sequential PyAV decode,
where the files' construction (Y = floor(a + b*N), lossless on flat frames) makes them exact; our
frames must equal that reference frame's RGB within 1 level (two builds of FFmpeg's YUV->RGB
conversion may round differently by one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip

QUIRKS = Path(__file__).resolve().parents[2].parent / "shared" / "cases" / "video-quirks"
pytestmark = pytest.mark.skipif(not QUIRKS.is_dir(), reason=f"{QUIRKS} is absent")
POLICY = FramePolicy(frames=17, height=64, width=96, fps=8)  # the files are 96x64: no resize, no crop


def luma_number(y: float, a: float, b: float) -> int:
    """N with floor(a + b*N) == y (Y integer), the construction of the crafted files."""
    n = int(round((y - a) / b))
    for cand in (n - 1, n, n + 1):
        if int(np.floor(a + b * cand)) == int(y):
            return cand
    raise AssertionError(f"luma {y} is not floor({a} + {b}*N) for any N")


def raw_reference(path: Path, a: float, b: float) -> tuple[list[int], list[float], list[np.ndarray]]:
    import av

    numbers, times, rgb = [], [], []
    with av.open(str(path)) as c:
        for fr in c.decode(video=0):
            y = np.frombuffer(fr.planes[0], np.uint8).reshape(fr.planes[0].height, -1)[:, : fr.width]
            numbers.append(luma_number(float(np.median(y)), a, b))
            times.append(float(fr.time))
            rgb.append(fr.to_ndarray(format="rgb24"))
    return numbers, times, rgb


def check_frames(path: Path, a: float, b: float, expected_numbers: list[int], decoder: str) -> None:
    """The automatic choice is `decoder`; it and PyAV (forced) both take the expected frames."""
    numbers, times, rgb = raw_reference(path, a, b)
    want = [numbers.index(n) for n in expected_numbers]
    for mode in ("auto", "pyav"):
        clip = decode_clip(str(path), POLICY, mode)
        assert clip.decoder == (decoder if mode == "auto" else "pyav"), clip.reasons
        assert clip.indices == want
        assert clip.timestamps == pytest.approx([times[i] for i in want], abs=1e-9)
        for k, i in enumerate(want):
            assert np.abs(clip.frames[k].astype(int) - rgb[i].astype(int)).max() <= 1, (mode, k)


def test_control_uncut() -> None:
    # frame N is shown at N/30 s: frame k of --fps 8 is N = floor(30 k / 8)
    check_frames(QUIRKS / "control_uncut.mp4", 20, 1.8, [30 * k // 8 for k in range(17)], "decord")


def test_streamcopy_cut_shows_source_frames_45_to_119() -> None:
    numbers, times, _ = raw_reference(QUIRKS / "streamcopy_cut.mp4", 20, 1.8)
    assert numbers == list(range(45, 120)) and times[0] == 0.0  # what a player shows
    check_frames(QUIRKS / "streamcopy_cut.mp4", 20, 1.8, [45 + 30 * k // 8 for k in range(17)], "pyav")


def test_vfr_takes_the_frame_shown_at_each_instant() -> None:
    # 30 frames at 30 fps over 0-1 s, then one frame every 0.5 s: at t the frame shown is
    # floor(30 t) before 1 s, 30 + floor((t - 1) / 0.5) after.
    ts = [k / 8 for k in range(17)]
    want = [int(30 * t) if t < 1 else 30 + int((t - 1) / 0.5) for t in ts]
    # decord reads a VFR MP4 right by index once the indices come from the timestamps
    check_frames(QUIRKS / "vfr.mp4", 0, 6, want, "decord")


def test_live_vp9_webm_decodes_all_24_frames() -> None:
    clip = decode_clip(str(QUIRKS / "vp9_live.webm"), POLICY)
    assert clip.decoder == "pyav" and clip.source_frames == 24
    assert clip.timestamps == pytest.approx([k / 8 for k in range(17)])


def test_av1_is_decoded_or_named() -> None:
    try:
        clip = decode_clip(str(QUIRKS / "av1.mp4"), POLICY)
    except ClipFailure as exc:
        assert exc.kind == "unsupported_codec" and "av1" in exc.message
    else:
        assert clip.decoder == "pyav" and clip.source_frames == 24


def test_audio_only_has_no_video_stream() -> None:
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(QUIRKS / "audio_only.mp4"), POLICY)
    assert exc.value.kind == "no_video" and "no video stream" in exc.value.message


def test_truncated_says_so_or_gives_the_intact_prefix() -> None:
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(QUIRKS / "truncated48.mp4"), POLICY)  # 17 frames at 8 fps: 2 s, prefix is 1.875 s
    assert exc.value.kind == "truncated" and exc.value.message.startswith("the file ends early: ")
    clip = decode_clip(str(QUIRKS / "truncated48.mp4"), FramePolicy(frames=9, height=64, width=96, fps=8))
    assert clip.decoder == "pyav" and clip.timestamps == pytest.approx([k / 8 for k in range(9)])


def test_one_frame_is_too_short_without_naming_a_flag() -> None:
    with pytest.raises(ClipFailure) as exc:
        decode_clip(str(QUIRKS / "one_frame.mp4"), POLICY)
    assert exc.value.kind == "too_short" and "--" not in exc.value.message
    assert exc.value.details["available_frames"] == 1 and exc.value.details["needed_frames"] == 17


def test_bom_manifest_reads_like_any_csv(tmp_path: Path) -> None:
    from carv_attrib.store.manifest import read_manifest

    t = read_manifest(QUIRKS / "manifest_with_bom.csv", tmp_path)
    assert t.vid == ["demo-00000", "demo-00001"]
    assert t.caption[0] == "a purple circle moving down over a black background"


def test_caption_markup_is_kept_as_written(tmp_path: Path) -> None:
    from carv_attrib.store.manifest import read_manifest

    t = read_manifest(QUIRKS / "caption_markup.json", tmp_path)
    assert t.caption == [
        "a purple circle moving down [/INST] over a black background",
        "[red] circle [b]moving[/b] down",
    ]
