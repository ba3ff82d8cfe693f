"""The report in a real headless browser (Chromium from the system packages; `.ci/run` installs it):
the page loads with no console message, lays out N queries x k result rows with every frame strip
decoded and an explain chart per result, runs none of the hostile caption's script, and a screenshot
is written under the test's tmp dir.

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
  document.title = "PROBE" + JSON.stringify({
    sections: document.querySelectorAll("section.query").length,
    rows: [...document.querySelectorAll("section.query")].map(s => s.querySelectorAll("tr.result").length),
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    charts: document.querySelectorAll("svg.chart").length,
    bars: document.querySelectorAll("svg.chart rect").length,
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
    prompts.write_text(json.dumps({str(v): "a clip" for v in [videos[0], videos[3], tmp_path / "gone.mp4"]}))
    k = 3
    doc = run_score(ScoreConfig(run=run, queries=[], prompts_file=prompts, top_k=k, workers=0, device="cpu",
                                explain=True))  # fmt: skip
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
    assert found["charts"] == 2 * scored * k  # by block and by stratum, per result
    strata = len(doc["queries"][0]["results"][0]["explain"]["by_stratum"])
    blocks = len(doc["queries"][0]["results"][0]["explain"]["by_block"])
    assert found["bars"] == scored * k * (blocks + strata)
    assert found["alerted"] == 0  # the hostile caption stayed text
