"""pipeline/report.py: the HTML page of an attribution JSON, parsed back: N queries x k result rows,
one frame strip per clip (the run's frame selection), failures and hostile captions shown as text.
(No browser here: the page is checked with html.parser.)"""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from carv_attrib.config import ReportConfig
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.report import run_report
from carv_attrib.pipeline.score import ScoreConfig, run_score
from tests.pipeline.report_fields import as_older


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_shows_queries_clips_frames_and_escapes_text(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    videos = sorted((demo_data / "videos").glob("*.mp4"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({str(v): "a clip" for v in [videos[0], videos[3], tmp_path / "gone.mp4"]}))
    doc = run_score(ScoreConfig(run=run, queries=[], prompts_file=prompts, top_k=3, workers=0, device="cpu"))
    hostile = '<script>alert(1)</script> [/INST] & "quotes"'
    doc["queries"][0]["results"][0]["caption"] = hostile
    (tmp_path / "a.json").write_text(json.dumps(doc))
    out = run_report(
        ReportConfig(attribution=tmp_path / "a.json", out=tmp_path / "r" / "report.html", frames=3)
    )
    html = out.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = Page()
    page.feed(html)
    assert hostile in "".join(page.text)  # shown literally, as text
    assert sum(1 for t, a in page.tags if t == "section") == 3
    assert sum(1 for t, a in page.tags if t == "tr" and a.get("class") == "result") == 2 * 3  # 2 scored x k
    assert "not scored:" in "".join(page.text)
    strips = [a["src"] for t, a in page.tags if t == "img"]
    assert len(strips) == 2 + 2 * 3  # the scored queries' and their clips'
    img = Image.open(io.BytesIO(base64.b64decode(strips[0].split(",", 1)[1])))
    enc = doc["index"]["encode"]
    assert img.size == (3 * enc["width"], enc["height"])  # 3 frames of the encode's size, side by side


def test_the_newer_fields_show_and_stay_text(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    """se, p_top_k, by_kind, uncertainty and null_prompt (optional fields) injected into a real
    document: the reading line, whiskers, kind bars and null-prompt table appear for that query only,
    and a hostile vid in the null-prompt ranking is shown as text."""
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    videos = sorted((demo_data / "videos").glob("*.mp4"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({str(v): "a circle moving down" for v in videos[:2]}))
    doc = run_score(ScoreConfig(run=run, queries=[], prompts_file=prompts, top_k=3, workers=0, device="cpu"))
    for q in doc["queries"]:  # both in the older shape, whether or not this `score` writes the fields
        as_older(q)
    q = doc["queries"][0]
    for i, r in enumerate(q["results"]):
        r |= {
            "se": 1e-6,
            "p_top_k": 1 - i / 3,
            "explain": {
                "total": r["score"],
                "by_block": {},
                "top_layers": [],
                "by_kind": {
                    "self_attention": r["score"],
                    "cross_attention": 0.0,
                    "feed_forward": 0.0,
                    "other": 0.0,
                },
            },
        }
    hostile = "<b onmouseover=alert(1)>x</b>"
    q["null_prompt"] = {"status": "ok", "results": [{**q["results"][0], "vid": hostile}], "top_k_overlap": 1 / 3,
                        "shared": [q["results"][0]["clip_id"]]}  # fmt: skip
    q["uncertainty"] = {"method": "cheap", "formula": "iid", "draws": 8, "dof": 7, "level": 0.9, "t": 1.895,
                        "clip_side": "mirrored"}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(doc))
    html = run_report(ReportConfig(attribution=tmp_path / "a.json", out=tmp_path / "r.html", frames=0))
    html = html.read_text()
    page = Page()
    page.feed(html)
    classes = [(t, a.get("class")) for t, a in page.tags]
    assert classes.count(("p", "reading")) == 2  # both queries share caption words
    assert classes.count(("svg", "forest")) == 2 * 3 and classes.count(("line", "whisker")) == 3 * 3
    assert classes.count(("svg", "kinds")) == 3 and classes.count(("tr", "null-row")) == 3
    assert hostile not in html and hostile in "".join(page.text)
    text = " ".join(page.text)
    assert "null-prompt ranking keeps 1 of the top 3" in text and "top-k overlap 0.33" in text
    assert "uncertainty: cheap, iid over 8 draws, level 0.9: the 90% interval is ± 1.9 se" in text
    assert "P(top-k)" in text


def test_not_an_attribution_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not an attribution JSON"):
        run_report(ReportConfig(attribution=tmp_path / "x.json", out=tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()
