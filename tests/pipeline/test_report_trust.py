"""pipeline/report.py does not trust its JSON (issue 23 item 8): frames only from the run's own clips,
a bounded frame policy whatever the JSON says, one decode per distinct file, and one line (exit 2)
for a malformed document. Hostile documents are made here from a real `score` output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from carv_attrib.config import ReportConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline import report as report_mod
from carv_attrib.pipeline.report import MAX_FRAMES, THUMB_SIDE, run_report, thumb_policy
from carv_attrib.pipeline.score import ScoreConfig, run_score


@pytest.fixture(scope="module")
def scored(
    featurized_run: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """A copy of the featurized run and its attribution document (2 queries, k = 3)."""
    tmp = tmp_path_factory.mktemp("report-trust")
    run = tmp / "run"
    shutil.copytree(featurized_run, run)
    videos = sorted((demo_data / "videos").glob("*.mp4"))
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps({str(v): "a clip" for v in videos[:2]}))
    doc = run_score(ScoreConfig(run=run, queries=[], prompts_file=prompts, top_k=3, workers=0, device="cpu"))
    return run, doc


def _write(tmp_path: Path, doc: dict, name: str = "a.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_a_path_outside_the_run_is_never_opened(scored, tmp_path: Path, monkeypatch) -> None:
    run, doc = scored
    doc = json.loads(json.dumps(doc))
    secret = tmp_path / "secret.mp4"
    shutil.copy(doc["queries"][0]["results"][0]["path"], secret)  # a real video, outside the run
    r0, r1 = doc["queries"][0]["results"][:2]
    r0["path"] = str(secret)  # the run's clip id, another file
    r1["clip_id"], r1["clip_id_str"], r1["path"] = 12345, "12345", str(secret)  # a clip the run lacks
    opened: list[str] = []
    real = report_mod.frame_strip
    monkeypatch.setattr(report_mod, "frame_strip", lambda p, *a: opened.append(p) or real(p, *a))
    html = run_report(ReportConfig(attribution=_write(tmp_path, doc), out=tmp_path / "r.html", frames=2))
    html = html.read_text()
    assert str(secret) not in opened
    assert html.count("not in run") >= 2
    assert "2 of 6 results name a clip that is not in the run" in html
    manifest = {r["path"] for q in doc["queries"] for r in q["results"]} - {str(secret)}
    assert set(opened) <= manifest | {q["path"] for q in doc["queries"]}


def test_no_run_is_refused_unless_named_or_frames_off(scored, tmp_path: Path) -> None:
    run, doc = scored
    doc = {**json.loads(json.dumps(doc)), "run": str(tmp_path / "gone")}
    src = _write(tmp_path, doc)
    with pytest.raises(UsageError, match=r"not a run .*give --run RUN, or --frames 0") as exc:
        run_report(ReportConfig(attribution=src, out=tmp_path / "r.html"))
    assert "\n" not in str(exc.value)
    del doc["run"]
    with pytest.raises(UsageError, match="names no run"):
        run_report(ReportConfig(attribution=_write(tmp_path, doc), out=tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()
    run_report(ReportConfig(attribution=src, out=tmp_path / "r0.html", frames=0))  # no frames: no run
    page = run_report(ReportConfig(attribution=src, out=tmp_path / "r1.html", frames=2, run=run)).read_text()
    assert page.count("<img") == 2 + 2 * 3 and "not in run" not in page


def test_the_frame_policy_is_bounded_whatever_the_json_says(scored, tmp_path: Path, monkeypatch) -> None:
    run, doc = scored
    doc = json.loads(json.dumps(doc))
    doc["index"]["encode"].update(frames=17, height=4096, width=4096)  # 17 x 4096² x 3: 855 MB per clip
    policies = []
    real = report_mod.frame_strip
    monkeypatch.setattr(report_mod, "frame_strip", lambda p, pol, n: policies.append(pol) or real(p, pol, n))
    run_report(ReportConfig(attribution=_write(tmp_path, doc), out=tmp_path / "r.html", frames=2))
    assert policies and all((p.height, p.width) == (32, 32) for p in policies)  # the run's record wins
    p = thumb_policy({"frames": 10**9, "height": 4096, "width": 2048, "fps": float("inf")})
    assert p.frames == MAX_FRAMES and (p.height, p.width) == (THUMB_SIDE, THUMB_SIDE // 2) and p.fps == 8.0
    assert thumb_policy({"frames": -3, "height": "x", "width": None}).frames == 1
    assert thumb_policy({}) == thumb_policy({"frames": 17, "height": 64, "width": 64, "fps": 8.0})


def test_each_distinct_file_is_decoded_once(scored, tmp_path: Path, monkeypatch) -> None:
    run, doc = scored
    doc = json.loads(json.dumps(doc))
    q = doc["queries"][0]
    q["results"] = [{**q["results"][i % 3], "rank": i + 1} for i in range(500)]
    doc["queries"] = [q]
    calls: list[str] = []
    real = report_mod.frame_strip
    monkeypatch.setattr(report_mod, "frame_strip", lambda p, *a: calls.append(p) or real(p, *a))
    page = run_report(ReportConfig(attribution=_write(tmp_path, doc), out=tmp_path / "r.html", frames=2))
    assert page.read_text().count('class="strip"') >= 500
    assert len(calls) == len(set(calls)) <= 1 + 3  # the query and its 3 distinct clips


def _broken(doc: dict, how: str) -> dict:
    doc = json.loads(json.dumps(doc))
    r = doc["queries"][0]["results"][1]
    if how == "type":
        r["score"] = "high"
    elif how == "missing":
        del r["clip_id"]
    elif how == "negative_k":
        doc["top_k"] = -3
    elif how == "rank":
        r["rank"] = 0
    elif how == "queries":
        doc["queries"] = {"not": "a list"}
    elif how == "encode":
        doc["index"]["encode"]["frames"] = "17"
    return doc


@pytest.mark.parametrize(
    ("how", "field"),
    [("type", "queries[0].results[1].score"), ("missing", "queries[0].results[1]"), ("negative_k", "top_k"),
     ("rank", "queries[0].results[1].rank"), ("queries", "queries"), ("encode", "index.encode.frames")],
)  # fmt: skip
def test_malformed_values_are_one_line_naming_the_field(scored, tmp_path: Path, how: str, field: str) -> None:
    _, doc = scored
    with pytest.raises(UsageError) as exc:
        run_report(ReportConfig(attribution=_write(tmp_path, _broken(doc, how)), out=tmp_path / "r.html"))
    msg = str(exc.value)
    assert f": {field}: " in msg and "\n" not in msg and len(msg) < 400, msg
    assert not (tmp_path / "r.html").exists()


def test_non_finite_numbers_and_junk_are_one_line(scored, tmp_path: Path) -> None:
    _, doc = scored
    text = json.dumps(doc).replace(f'"score": {json.dumps(doc["queries"][0]["results"][0]["score"])}',
                                   '"score": NaN', 1)  # fmt: skip
    (tmp_path / "nan.json").write_text(text)
    with pytest.raises(UsageError, match=r"queries\[0\]\.results\[0\]\.score: nan is not a finite number"):
        run_report(ReportConfig(attribution=tmp_path / "nan.json", out=tmp_path / "r.html"))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="not a readable attribution JSON"):
        run_report(ReportConfig(attribution=tmp_path / "deep.json", out=tmp_path / "r.html"))
    (tmp_path / "bad.json").write_text('{"queries": [], "index": ')
    with pytest.raises(UsageError, match="not a readable attribution JSON"):
        run_report(ReportConfig(attribution=tmp_path / "bad.json", out=tmp_path / "r.html"))


def test_the_cli_says_one_line_and_exits_2(scored, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    _, doc = scored
    src = _write(tmp_path, _broken(doc, "negative_k"))
    res = CliRunner().invoke(app, ["report", str(src), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2, res.output
    assert "top_k" in res.output and "Traceback" not in res.output
