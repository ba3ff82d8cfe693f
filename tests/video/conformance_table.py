"""Print the conformance corpus and the shared quirk files as a Markdown table (not a test).

    PYTHONPATH=. python -m tests.video.conformance_table

Each corpus row runs `test_conformance.check` (the same assertions as the tests; a failing check
shows as FAIL with its message). Timestamps are seconds after the first displayed frame.
"""

from __future__ import annotations

import tempfile
from fractions import Fraction
from pathlib import Path

from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip
from tests.video import test_conformance as tc
from tests.video.test_quirk_files import QUIRKS


def _short(ts: list[float]) -> str:
    shown = ", ".join(f"{t:.3g}" for t in ts[:6])
    return f"{shown}{', ...' if len(ts) > 6 else ''} ({len(ts)})"


def corpus_rows(work: Path) -> list[str]:
    rows = []
    for name, case in tc.CASES.items():
        d = work / name.replace(":", "_")
        d.mkdir()
        try:
            path = case.build(tc.FF, d)
            r = tc.check(name, path)
            if r["result"] == "ok":
                pol = case.policy
                rate = Fraction(repr(float(pol.fps))) if pol.fps else Fraction(1)
                exp = [float(Fraction(k) / rate) for k in range(pol.frames)]
                taken = _short(r["taken"])
                expected = f"shown at {_short(exp)}" if pol.fps else "consecutive"
                verdict = "PASS: frames = ffmpeg's at those instants"
                rows.append(f"| {case.kind} | {name} | {r['decoder']} | {taken} | {expected} | {verdict} |")
            else:
                msg = r["message"].replace("|", "/")[:90]
                rows.append(
                    f"| {case.kind} | {name} | - | - | failure {case.failure} | PASS: {r['result']}: {msg} |"
                )
        except (AssertionError, Exception) as exc:  # noqa: B014 - show any failure as a row
            rows.append(f"| {case.kind} | {name} | ? | ? | ? | FAIL: {type(exc).__name__}: {str(exc)[:80]} |")
    return rows


def shared_rows() -> list[str]:
    if not QUIRKS.is_dir():
        return [f"| (shared files absent: {QUIRKS}) |"]
    rows = []
    policy = FramePolicy(frames=17, height=64, width=96, fps=8)
    for f in sorted(QUIRKS.glob("*")):
        if f.suffix not in {".mp4", ".webm"}:
            continue
        try:
            c = decode_clip(str(f), policy)
            rows.append(
                f"| {f.name} | {c.decoder} | {_short(c.timestamps)} | {', '.join(c.reasons) or '-'} |"
            )
        except ClipFailure as exc:
            rows.append(f"| {f.name} | - | {exc.kind}: {exc.message.replace('|', '/')[:110]} | - |")
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("| kind | case | decoder | timestamps taken (s) | expected | verdict |")
        print("|---|---|---|---|---|---|")
        print("\n".join(corpus_rows(Path(tmp))))
    print()
    print("Shared files, --frames 17 --fps 8 --size 96x64:")
    print()
    print("| file | decoder | timestamps taken (s) / failure | why PyAV |")
    print("|---|---|---|---|")
    print("\n".join(shared_rows()))


if __name__ == "__main__":
    main()
