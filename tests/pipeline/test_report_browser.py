"""The report in a real headless browser (Chromium from the system packages; `.ci/run` installs it):
the page loads with no console message, lays out N queries x k result rows with every frame strip
decoded and an explain chart per result, runs none of the hostile caption's script, and a screenshot
is written under the test's tmp dir. One query carries the newer optional fields (se, p_top_k,
explain.by_kind, uncertainty, null_prompt), injected into a real `score --explain` document, and gets
their elements; the other keeps the older shape and gets none of them.

The browser's console is read from its log (`--enable-logging=stderr`: one "CONSOLE" line per
message or uncaught error); a page with a deliberate error checks that the detector sees one. The
layout is read from the DOM after load (`--dump-dom`) of a copy of the page with a small probe
script appended, which writes what it counted into the document title.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from carv_attrib.config import ReportConfig
from carv_attrib.pipeline.report import run_report
from carv_attrib.pipeline.score import ScoreConfig, run_score
from tests.pipeline.report_fields import as_older, inject_newer_fields

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 1600)


def _browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="module")
def browser() -> str:
    found = _browser()
    if found is None:
        if os.environ.get("CI"):  # .ci/run installs Chromium; CI must not pass by skipping the browser
            pytest.fail("no Chromium on PATH under CI: .ci/run should have installed it")
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    return found


def _run(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _console(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ":CONSOLE" in ln]


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const sections = [...document.querySelectorAll("section.query")];
  const per = sel => sections.map(s => s.querySelectorAll(sel).length);  // counted per query
  document.title = "PROBE" + JSON.stringify({
    sections: document.querySelectorAll("section.query").length,
    rows: [...document.querySelectorAll("section.query")].map(s => s.querySelectorAll("tr.result").length),
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    charts: document.querySelectorAll("svg.chart").length,
    bars: document.querySelectorAll("svg.chart rect").length,
    written: document.querySelectorAll("svg.chart text").length,
    forests: per("svg.forest"),
    whiskers: document.querySelectorAll("svg.forest line.whisker").length,
    kinds: per("svg.kinds rect"),
    readings: sections.map(s => (s.querySelector("p.reading") || {}).textContent || ""),
    nullRows: document.querySelectorAll("table.null tr.null-row").length,
    pTopK: [...document.querySelectorAll("th")].filter(t => t.textContent === "P(top-k)").length,
    alerted: window.__alerted || 0,
  }) + "PROBE";
});
window.alert = () => { window.__alerted = (window.__alerted || 0) + 1; };
</script>"""


def test_the_report_renders_in_chromium(
    browser: str, featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    # The console detector sees an error when there is one.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('x'); notAFunction();</script></body></html>")
    assert len(_console(_run(browser, tmp_path, "--dump-dom", bad.as_uri()).stderr)) == 2

    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    videos = sorted((demo_data / "videos").glob("*.mp4"))
    prompts = tmp_path / "prompts.json"
    queries = [videos[0], videos[3], tmp_path / "gone.mp4"]
    prompts.write_text(json.dumps({str(v): "a circle moving down" for v in queries}))
    k = 3
    doc = run_score(ScoreConfig(run=run, queries=[], prompts_file=prompts, top_k=k, workers=0, device="cpu",
                                explain=True))  # fmt: skip
    inject_newer_fields(doc["queries"][0])
    as_older(doc["queries"][1])
    doc["queries"][0]["results"][0]["caption"] = (
        "<script>alert(1)</script> [/INST] <img src=x onerror=alert(2)>"
    )
    (tmp_path / "a.json").write_text(json.dumps(doc))
    page = run_report(ReportConfig(attribution=tmp_path / "a.json", out=tmp_path / "report.html", frames=4))

    shot = tmp_path / "report.png"
    loaded = _run(browser, tmp_path, f"--screenshot={shot}", page.as_uri())
    assert _console(loaded.stderr) == [], "\n".join(_console(loaded.stderr))
    img = Image.open(shot)
    assert img.size == WINDOW
    assert len(set(img.convert("L").getdata())) > 16  # frames and text, not a blank page
    print(f"screenshot: {shot}")

    probed = tmp_path / "probed.html"
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    dom = _run(browser, tmp_path, "--dump-dom", probed.as_uri()).stdout
    found = json.loads(re.search(r"PROBE(.*?)PROBE", dom).group(1).replace("&quot;", '"'))
    scored = sum(q["status"] == "ok" for q in doc["queries"])
    assert found["sections"] == 3 and found["rows"] == [k, k, 0]  # 2 scored x k clips, 1 failed query
    assert found["images"] == scored + scored * k and found["broken"] == 0
    assert found["charts"] == 3 * scored * k  # by block, top layers and by stratum, per result
    explain = doc["queries"][0]["results"][0]["explain"]
    parts = len(explain["by_stratum"]) + len(explain["by_block"]) + len(explain["top_layers"])
    assert found["bars"] == scored * k * parts
    assert found["written"] > found["bars"]  # the axes' values written, not hover titles only
    assert found["forests"] == [k, k, 0]  # a score dot per result on its query's axis
    assert found["whiskers"] == 3 * k  # ± se whisker and its two caps, only where se exists
    assert found["kinds"][1:] == [0, 0] and found["kinds"][0] >= k  # by_kind segments, new query only
    assert found["nullRows"] == k and found["pTopK"] == 1
    new, old, _ = found["readings"]
    assert "of the top 3 share a caption word with the prompt" in new and "error bars" in new
    assert "null-prompt ranking keeps" in new and "cross-attention" in new
    assert "share a caption word" in old and "error bars" not in old and "null-prompt" not in old
    assert found["alerted"] == 0  # the hostile caption and vid stayed text
