"""`report`: one self-contained HTML page for an attribution JSON: each query's frames beside its top-k
training clips (frames, vid, caption, score), failed queries with their error, the aggregate table, and
the provenance in a collapsible block. Results scored with `score --explain` get two small bar charts
(inline SVG): the score's split over the transformer's blocks and over the timestep strata.

Frames are taken with the run's own frame selection (`carv_attrib.video.decode.decode_clip` with the
index's recorded frame policy), --frames of them evenly spaced, as one PNG strip per clip inlined as a
data URI, so the page needs nothing beside it. The page is rendered by Jinja2 with autoescaping:
captions, paths and errors are shown as text, whatever they contain (`<script>`, `[/INST]`).

    from carv_attrib.pipeline.report import ReportConfig, run_report
    path = run_report(ReportConfig(attribution="out.json", out="report.html"))
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from carv_attrib.config import ReportConfig
from carv_attrib.errors import UsageError
from carv_attrib.store.shards import atomic_path
from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip

__all__ = ["ReportConfig", "run_report", "frame_strip", "bar_chart", "explain_charts"]


def frame_strip(path: str, policy: FramePolicy, n: int) -> str:
    """A data: URI of a PNG with n of the clip's frames side by side (uint8 RGB, the policy's size).
    Raises ClipFailure when the clip cannot be decoded."""
    clip = decode_clip(path, policy)  # (F, H, W, 3) uint8, the frames encode took
    idx = np.linspace(0, len(clip.frames) - 1, num=min(n, len(clip.frames))).round().astype(int)
    strip = np.concatenate([np.asarray(clip.frames[i]) for i in idx], axis=1)  # (H, n·W, 3)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CHART_W, CHART_H, AXIS_H = 220, 64, 12  # px of one bar chart and of its tick labels under it


def bar_chart(title: str, items: list[tuple[str, str, float]]) -> dict[str, Any]:
    """The geometry of one inline-SVG bar chart: one column per (label, tick, value), heights scaled
    to the largest |value|, a zero line in the middle when some value is negative; ticks are shown
    under the columns when they fit (≥ 24 px each), labels as hover titles. Text stays text (the
    template escapes it)."""
    n = max(len(items), 1)
    peak = max((abs(v) for *_, v in items), default=0.0) or 1.0
    signed = any(v < 0 for *_, v in items)
    zero = CHART_H / 2 if signed else CHART_H - 1.0  # y of the zero line
    room = zero - 2 if signed else CHART_H - 3  # px for the largest bar
    slot = CHART_W / n
    bars = []
    for i, (label, tick, v) in enumerate(items):
        h = max(abs(v) / peak * room, 0.5)
        y = zero - h if v >= 0 else zero
        bars.append({"x": round(i * slot + slot * 0.1, 2), "y": round(y, 2), "w": round(slot * 0.8, 2),
                     "h": round(h, 2), "neg": v < 0, "label": label, "value": v,
                     "tick": tick, "tick_x": round((i + 0.5) * slot, 2)})  # fmt: skip
    return {"title": title, "w": CHART_W, "h": CHART_H + AXIS_H, "plot_h": CHART_H, "zero": round(zero, 2),
            "ticks": slot >= 24, "tick_y": CHART_H + AXIS_H - 2, "bars": bars}  # fmt: skip


def explain_charts(explain: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The charts of one result's `explain` block: by block, then by timestep stratum (σ order)."""
    if not explain:
        return []
    charts = []
    if explain.get("by_block"):
        items = [(k, k.replace("blocks.", "b"), v) for k, v in explain["by_block"].items()]
        charts.append(bar_chart("by block", items))
    if explain.get("by_stratum"):
        items = [(f"σ {x['sigma_lo']:.2f}–{x['sigma_hi']:.2f} ({x['draws']} draws)", f"{x['sigma_lo']:.2f}",
                  x["score"]) for x in explain["by_stratum"]]  # fmt: skip
        charts.append(bar_chart("by timestep stratum (equal-probability strata, low σ → high σ)", items))
    return charts


def _policy(doc: dict[str, Any]) -> FramePolicy:
    enc = doc["index"].get("encode", {})
    return FramePolicy(
        frames=enc.get("frames", 17), height=enc.get("height", 64), width=enc.get("width", 64),
        fps=enc.get("fps", 8.0), pad_short=enc.get("pad_short", False),
    )  # fmt: skip


def run_report(cfg: ReportConfig) -> Path:
    """Render cfg.attribution to cfg.out (atomically). UsageError (exit 2) for a file that is not an
    attribution JSON; a clip that cannot be decoded shows its failure in place of its frames."""
    cfg.validate()
    try:
        doc = json.loads(Path(cfg.attribution).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{cfg.attribution}: not a readable attribution JSON ({exc})") from None
    if not isinstance(doc, dict) or "queries" not in doc or "index" not in doc:
        raise UsageError(f"{cfg.attribution}: not an attribution JSON from `carv-attrib score`")
    policy = _policy(doc)

    def strip(path: str | None) -> tuple[str | None, str | None]:
        if cfg.frames == 0 or not path:
            return None, None
        try:
            return frame_strip(path, policy, cfg.frames), None
        except ClipFailure as exc:
            return None, f"{exc.kind}: {exc}"

    queries = []
    for q in doc["queries"]:
        q_strip, _ = strip(q.get("path"))
        results = []
        for r in q.get("results", []):
            s, err = strip(r.get("path"))
            results.append({**r, "strip": s, "strip_error": err, "charts": explain_charts(r.get("explain"))})
        queries.append({**q, "strip": q_strip, "results": results, "why": any(r["charts"] for r in results)})
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("carv_attrib", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("report.html.j2").render(
        title=Path(cfg.attribution).name,
        n_queries=len(queries),
        index_fp=doc["index"].get("fingerprint"),
        count=doc["index"].get("count"),
        created_at=doc.get("created_at", ""),
        version=doc.get("tool", {}).get("version", ""),
        warnings=doc.get("warnings", []),
        queries=queries,
        aggregate=doc.get("aggregate"),
        provenance=json.dumps(doc["index"], indent=2, ensure_ascii=False),
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
