"""Honest progress rates (issue 24, item 5: "47195 clips/s"): work over time since the start, skipped
steps not counted, nothing shown before MIN_RATE_S; the remaining time follows that rate."""

from __future__ import annotations

from carv_attrib.cli.progress import MIN_RATE_S, ClipProgress, WorkRate


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_is_not_a_rate() -> None:
    clock = Clock()
    rate = WorkRate(clock)
    rate.start()
    clock.t += 0.001
    for _ in range(4):  # a VAE batch reports its 4 clips at once
        rate.add()
    assert rate.per_s() is None and rate.remaining_s(10) is None
    clock.t = 100.0 + MIN_RATE_S + 2  # 4 s in all
    assert rate.per_s() == 1.0 and rate.remaining_s(10) == 10.0


def test_skipped_steps_are_not_work() -> None:
    clock = Clock()
    rate = WorkRate(clock)
    rate.start()
    for _ in range(1000):
        rate.add(skipped=True)
    clock.t += 10
    assert rate.per_s() is None
    rate.add()
    assert rate.per_s() == 0.1


def test_clip_progress_fields() -> None:
    clock = Clock()
    p = ClipProgress("encode", clock=clock)
    with p:
        p("start", {"todo": 10})
        for _ in range(4):
            p("clip", {"status": "ok"})
        assert p.fields() == {"rate": "", "eta": "-:--:--"}
        clock.t += 8
        p("clip", {"status": "ok", "skipped": True})
        p("clip", {"status": "too_short"})
        assert p.fields() == {"rate": "0.62 clips/s", "eta": "0:00:06"}  # 5 clips in 8 s; 4 to go
        assert (p.done, p.failures) == (6, 1)
