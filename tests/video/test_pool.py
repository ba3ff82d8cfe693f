from __future__ import annotations

from pathlib import Path

from carv_attrib.video.decode import ClipFailure, DecodedClip, FramePolicy
from carv_attrib.video.pool import DecodePool
from tests.video import faulty_decoder


def test_crashes_and_hangs_become_recorded_failures(demo_data: Path, tmp_path: Path) -> None:
    good = [str(p) for p in sorted((demo_data / "videos").glob("*.mp4"))[:4]]
    tasks = [
        (0, good[0]),
        (1, str(tmp_path / "abort.mp4")),
        (2, good[1]),
        (3, str(tmp_path / "hang.mp4")),
        (4, str(tmp_path / "segv.mp4")),
        (5, good[2]),
        (6, str(tmp_path / "missing.mp4")),
        (7, good[3]),
    ]
    policy = FramePolicy(frames=9, height=32, width=32)
    with DecodePool(policy, workers=2, timeout=3.0, decode_fn=faulty_decoder.decode) as pool:
        results = list(pool.imap(tasks))
    assert [k for k, _ in results] == list(range(8)), "results come back in submission order"
    kinds = {k: (r.kind if isinstance(r, ClipFailure) else "ok") for k, r in results}
    assert kinds == {0: "ok", 1: "crash", 2: "ok", 3: "timeout", 4: "crash", 5: "ok", 6: "missing", 7: "ok"}
    for k, r in results:
        if kinds[k] == "ok":
            assert isinstance(r, DecodedClip) and r.frames.shape == (9, 32, 32, 3)


def test_in_process_mode(demo_data: Path) -> None:
    path = str(next((demo_data / "videos").glob("*.mp4")))
    with DecodePool(FramePolicy(frames=9, height=32, width=32), workers=0) as pool:
        ((key, clip),) = pool.imap([("x", path)])
    assert key == "x" and clip.frames.shape == (9, 32, 32, 3)


def test_failure_details_cross_process_boundaries(demo_data: Path) -> None:
    path = str(next((demo_data / "videos").glob("*.mp4")))  # 24 frames at 8 fps: 3 s
    policy = FramePolicy(frames=41, height=32, width=32, fps=8)  # needs 5 s
    with DecodePool(policy, workers=1) as pool:
        ((_, failure),) = pool.imap([(0, path)])
    assert isinstance(failure, ClipFailure) and failure.kind == "too_short"
    assert failure.details["available_frames"] == 24 and failure.details["needed_frames"] == 41
