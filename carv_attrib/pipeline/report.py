"""`report`: one self-contained HTML page for an attribution JSON, laid out for judging a ranking: each
query's frames beside its top-k training clips (frames, vid, caption, score), failed queries with their
error, the aggregate table, and the provenance in a collapsible block.

Per query, a one-line reading in plain words (`reading`), and per result its score
drawn as a dot with its ± se whisker on the query's score axis (overlapping whiskers: ranks the scores
cannot order), P(top-k), pctl and z. Results scored with `score --explain` get "why" charts (inline
SVG) on axes shared by the query's results, one axis per chart kind, zero line and values written, so
rank 1's bars and rank 10's compare by eye: the score's split over the transformer's blocks, its top
layers, the timestep strata and, when the JSON has `explain.by_kind`, the caption-vs-video split (self-
vs cross-attention, feed-forward, other) as one diverging stacked bar. A query with a `null_prompt`
block gets the null-prompt ranking beside the captioned one. Every newer field is optional: an older
JSON renders as before, less what it lacks.

Frames are taken with the run's own frame selection (`carv_attrib.video.decode.decode_clip` with the
run's recorded frame policy, clamped: at most MAX_FRAMES frames, at most THUMB_SIDE px on a side),
--frames of them evenly spaced, as one PNG strip per clip inlined as a data URI, so the page needs
nothing beside it. Each distinct file is decoded once, however many results name it.

The JSON is not trusted: it is validated against the attribution schema (`report_schema`: the
provenance may be partial, every value present must have the schema's type and range; NaN and
infinities refused) with one line naming the field. A training clip's frames come only from the
run's own manifest (the JSON's `run`, or `--run`): a result whose clip id the run does not hold, or
whose `path` disagrees with the run's record, is never opened ("not in run", counted on the page). A
query's frames come from its path when that is a regular file (the user's own query video). The page
is rendered by Jinja2 with autoescaping: captions, paths and errors are shown as text, whatever they
contain (`<script>`, `[/INST]`).

    from carv_attrib.pipeline.report import ReportConfig, run_report
    path = run_report(ReportConfig(attribution="out.json", out="report.html"))
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from carv_attrib.config import ReportConfig
from carv_attrib.errors import UsageError
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import atomic_path
from carv_attrib.video.decode import ClipFailure, FramePolicy, decode_clip

__all__ = ["ReportConfig", "run_report", "frame_strip", "Axis", "column_chart", "hbar_chart", "kind_chart",
           "forest", "query_charts", "null_view", "STOP_WORDS", "content_words", "shared_words",
           "indistinct_top", "settled_gaps", "null_kept", "cross_share", "reading", "report_schema",
           "check_document", "thumb_policy", "MAX_FRAMES", "THUMB_SIDE"]  # fmt: skip

log = logging.getLogger(__name__)


def frame_strip(path: str, policy: FramePolicy, n: int) -> str:
    """A data: URI of a PNG with n of the clip's frames side by side (uint8 RGB, the policy's size).
    Raises ClipFailure when the clip cannot be decoded."""
    clip = decode_clip(path, policy)  # (F, H, W, 3) uint8, the frames encode took
    idx = np.linspace(0, len(clip.frames) - 1, num=min(n, len(clip.frames))).round().astype(int)
    strip = np.concatenate([np.asarray(clip.frames[i]) for i in idx], axis=1)  # (H, n·W, 3)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Axis:
    """One query's scale for one kind of chart: every result's chart of that kind maps values through
    the same [lo, hi], so rank 1's bars and rank 10's can be compared by eye."""

    lo: float
    hi: float

    @classmethod
    def over(cls, values: Iterable[float], zero: bool = True, pad: float = 0.0) -> Axis:
        """The range of `values` (with 0 in it when `zero`: bars grow from the zero line), widened by
        `pad` of its span on each side; a degenerate range is widened so that it maps somewhere."""
        vals = [float(v) for v in values if v is not None and math.isfinite(v)]
        lo, hi = min(vals, default=0.0), max(vals, default=0.0)
        if zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        span = hi - lo
        if span <= 0:
            span = abs(hi) * 0.02 or 1.0
            lo, hi = lo - span / 2, hi + span / 2
        return cls(lo - pad * span, hi + pad * span)

    def frac(self, v: float) -> float:
        """v's place on the axis, 0 at lo and 1 at hi."""
        return (v - self.lo) / (self.hi - self.lo)


def _g(v: float) -> str:
    """A value as written on a chart: 3 significant digits, signed when negative only."""
    return f"{v:.3g}"


CHART_W, CHART_H, AXIS_H, GUTTER = 220, 72, 12, 44  # px: plot, its height, tick row, y-label gutter
PAD = 10  # px kept above and below the plot for the values written over the bars


def column_chart(title: str, items: list[tuple[str, str, float]], axis: Axis) -> dict[str, Any]:
    """The geometry of one inline-SVG column chart on the query's shared `axis`: one column per
    (label, tick, value) from the zero line, the axis' top, zero and bottom written in the left
    gutter, each value written over its column when a column is ≥ 34 px wide and its tick under it
    when ≥ 24 px (else the hover title only); the plot widens from 220 px to 440 px to make room.
    Text stays text (the template escapes it)."""
    n = max(len(items), 1)
    plot_w = min(max(CHART_W, 36 * n), 2 * CHART_W)  # room to write each value, up to ~12 columns
    slot = plot_w / n

    def y(v: float) -> float:
        return PAD + (1 - axis.frac(v)) * (CHART_H - 2 * PAD)

    zero = y(0.0)
    bars = []
    for i, (label, tick, v) in enumerate(items):
        h = max(abs(y(v) - zero), 0.5)
        top = zero - h if v >= 0 else zero
        bars.append({"x": round(GUTTER + i * slot + slot * 0.1, 2), "y": round(top, 2),
                     "w": round(slot * 0.8, 2), "h": round(h, 2), "neg": v < 0, "label": label,
                     "value": v, "text": _g(v), "tick": tick, "cx": round(GUTTER + (i + 0.5) * slot, 2),
                     "ty": round(top - 2 if v >= 0 else top + h + 8, 2)})  # fmt: skip
    marks = [(axis.hi, y(axis.hi)), (0.0, zero)] + ([(axis.lo, y(axis.lo))] if axis.lo < 0 else [])
    # a mark closer than 9 px to the zero line would print over it: keep zero's
    marks = [(v, yy) for v, yy in marks if v == 0.0 or abs(yy - zero) >= 9]
    return {"title": title, "w": GUTTER + plot_w, "h": CHART_H + AXIS_H, "zero": round(zero, 2),
            "x0": GUTTER, "write_values": slot >= 34, "ticks": slot >= 24, "tick_y": CHART_H + AXIS_H - 2,
            "bars": bars, "marks": [{"text": _g(v), "y": round(yy + 3, 2)} for v, yy in marks]}  # fmt: skip


def _apart(zero: float, left: float, right: float, room: float = 26.0) -> bool:
    """Whether the "0" under a zero line at x=`zero` clears the end labels written at `left` and
    `right` (a value of ~7 characters takes ~26 px at 9 px); else the zero line alone marks 0."""
    return zero - left >= room and right - zero >= room


HBAR_LABEL, HBAR_W, HBAR_VALUE, HBAR_ROW = 130, 110, 44, 13  # px: label, bar area, value, row height


def hbar_chart(title: str, items: list[tuple[str, str, float]], axis: Axis) -> dict[str, Any]:
    """One horizontal bar per (label, tick, value) on the shared `axis` (for named terms such as the
    top layers, whose names need room): tick on the left, bar from the zero line, value written on
    the right, the axis' ends and zero written under the bars."""

    def x(v: float) -> float:
        return HBAR_LABEL + axis.frac(v) * HBAR_W

    zero = x(0.0)
    bars = []
    for i, (label, tick, v) in enumerate(items):
        w = max(abs(x(v) - zero), 0.5)
        bars.append({"x": round(zero if v >= 0 else zero - w, 2), "y": i * HBAR_ROW + 2, "w": round(w, 2),
                     "h": HBAR_ROW - 3, "neg": v < 0, "label": label, "value": v, "text": _g(v),
                     "tick": tick, "ty": i * HBAR_ROW + HBAR_ROW - 3})  # fmt: skip
    base, right = len(items) * HBAR_ROW, HBAR_LABEL + HBAR_W
    marks = [{"text": _g(axis.lo), "x": HBAR_LABEL, "anchor": "start"}]
    if _apart(zero, HBAR_LABEL, right):
        marks.append({"text": "0", "x": round(zero, 2), "anchor": "middle"})
    marks.append({"text": _g(axis.hi), "x": right, "anchor": "end"})
    return {"title": title, "w": right + HBAR_VALUE, "h": base + 12, "zero": round(zero, 2),
            "label_x": HBAR_LABEL - 4, "value_x": right + 4, "base": base, "bars": bars,
            "marks": marks}  # fmt: skip


# explain.by_kind's parts in drawing order, with the words and CSS class the page shows them under:
# attention over the video's own tokens, attention to the caption's tokens (the text conditioning),
# the MLPs, and everything else (embeddings, norms, the head).
KINDS = (
    ("self_attention", "self-attn (video)", "k-self"),
    ("cross_attention", "cross-attn (caption)", "k-cross"),
    ("feed_forward", "feed-forward", "k-ff"),
    ("other", "other", "k-other"),
)
KIND_W, KIND_H = 220, 28  # px of the stacked bar and its axis row


def _kinds(raw: Any) -> dict[str, float] | None:
    """by_kind with its four parts as floats (a missing or null part is 0), None when there is none:
    the fields are new, so a partial or null block draws what it has instead of failing the page."""
    if not isinstance(raw, dict) or not raw:
        return None
    return {name: _finite(raw.get(name)) or 0.0 for name, *_ in KINDS}


def kind_axis(kinds: list[dict[str, float]]) -> Axis:
    """The shared axis of a query's by_kind bars: from the most negative sum of negative parts to the
    largest sum of positive parts (each bar stacks its positive parts right of zero, its negative
    parts left of it)."""
    pos = [sum(max(k.get(name, 0.0), 0.0) for name, *_ in KINDS) for k in kinds]
    neg = [sum(min(k.get(name, 0.0), 0.0) for name, *_ in KINDS) for k in kinds]
    return Axis.over(pos + neg)


def kind_chart(kinds: dict[str, float], axis: Axis) -> dict[str, Any]:
    """The caption-vs-video split of one score as one diverging stacked bar on the shared `axis`,
    with a legend row of the four parts and their values (the parts add up to the score)."""

    def x(v: float) -> float:
        return 1 + axis.frac(v) * (KIND_W - 2)

    zero, up, down, segs = x(0.0), 0.0, 0.0, []
    for name, words, css in KINDS:
        v = float(kinds.get(name, 0.0))
        a, b = (up, up + v) if v >= 0 else (down + v, down)
        up, down = (b, down) if v >= 0 else (up, a)
        if v != 0:
            segs.append({"x": round(x(a), 2), "w": round(max(x(b) - x(a), 0.5), 2), "css": css,
                         "label": words, "value": v})  # fmt: skip
    legend = [
        {"css": css, "label": words, "text": _g(float(kinds.get(name, 0.0)))} for name, words, css in KINDS
    ]
    return {"w": KIND_W, "h": KIND_H, "zero": round(zero, 2), "segs": segs, "legend": legend,
            "lo": _g(axis.lo), "hi": _g(axis.hi), "zero_label": _apart(zero, 1, KIND_W - 1),
            "total": _g(sum(float(v) for v in kinds.values()))}  # fmt: skip


def _tick(v: float, span: float) -> str:
    """A value at an axis end, with decimals enough to tell the two ends apart at this span (one
    query's scores may differ in their fourth significant digit only: 0.99938 vs 0.99999)."""
    decimals = max(0, 1 - math.floor(math.log10(span))) if span > 0 else 3
    return f"{v:.{min(decimals, 12)}f}"


FOREST_W, FOREST_H = 160, 30  # px of one result's score ± se on the query's axis


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def score_axis(results: list[dict[str, Any]]) -> Axis:
    """The query's score axis: every result's score ± se (se 0 when absent), zero left out (scores of
    one query cluster far from it), padded 6 % so end dots are not cut."""
    ends = []
    for r in results:
        se = _finite(r.get("se")) or 0.0
        ends += [r["score"] - se, r["score"] + se]
    return Axis.over(ends, zero=False, pad=0.06)


def forest(r: dict[str, Any], axis: Axis) -> dict[str, Any]:
    """One result's score as a dot with its ± se whisker (none without se) on the query's score axis,
    the axis' ends written under it: stacked down the table, overlapping whiskers show which ranks
    the scores cannot order."""

    def x(v: float) -> float:
        return 6 + axis.frac(v) * (FOREST_W - 12)

    se = _finite(r.get("se"))
    span = axis.hi - axis.lo
    out = {"w": FOREST_W, "h": FOREST_H, "cx": round(x(r["score"]), 2), "se": se,
           "lo": _tick(axis.lo, span), "hi": _tick(axis.hi, span)}  # fmt: skip
    if se is not None:
        out |= {"x1": round(x(r["score"] - se), 2), "x2": round(x(r["score"] + se), 2)}
    return out


def _split_items(explain: dict[str, Any], name: str) -> list[tuple[str, str, float]]:
    """(label, tick, value) of one explain split, or [] when the result has none."""
    if name == "by_block":
        return [(k, k.replace("blocks.", "b"), v) for k, v in (explain.get("by_block") or {}).items()]
    if name == "top_layers":
        return [(x["layer"], x["layer"].replace("blocks.", "b")[-24:], x["score"])
                for x in explain.get("top_layers") or []]  # fmt: skip
    return [
        (
            f"σ {x['sigma_lo']:.2f}–{x['sigma_hi']:.2f} ({x['draws']} draws)",
            f"{x['sigma_lo']:.2f}",
            x["score"],
        )
        for x in explain.get("by_stratum") or []
    ]


# the explain splits drawn, in order: (JSON key, chart title, chart kind)
SPLITS = (
    ("by_block", "by block", "columns"),
    ("top_layers", "in its largest layer terms (by |term|)", "hbars"),
    ("by_stratum", "by timestep stratum (equal-probability strata, low σ → high σ)", "columns"),
)


def query_charts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per result (in order), its charts on the query's shared axes: {"splits": [chart...], "kinds":
    chart or None, "forest": chart}. Each split's axis spans every result's values of that split, so
    one query's charts share one scale per split; a result without a split gets no chart for it."""
    explains = [r.get("explain") or {} for r in results]
    axes = {name: Axis.over(v for e in explains for *_, v in _split_items(e, name)) for name, *_ in SPLITS}
    kinds = [_kinds(e.get("by_kind")) for e in explains]
    k_axis = kind_axis([k for k in kinds if k])
    s_axis = score_axis(results)
    out = []
    for r, e, k in zip(results, explains, kinds):
        splits = []
        for name, title, kind in SPLITS:
            items = _split_items(e, name)
            if items:
                draw = column_chart if kind == "columns" else hbar_chart
                splits.append({"kind": kind, **draw(title, items, axes[name])})
        out.append({"splits": splits, "kinds": kind_chart(k, k_axis) if k else None,
                    "forest": forest(r, s_axis)})  # fmt: skip
    return out


def null_view(q: dict[str, Any]) -> dict[str, Any] | None:
    """The null-prompt ranking beside the captioned one: rows of (rank, captioned result, null-prompt
    result), each marked shared when its clip is in both top-k lists; its error when the null pass
    failed; None when the query has none."""
    null = q.get("null_prompt")
    if isinstance(null, dict) and null.get("status") == "error":  # the null pass failed, not the query
        return {"error": str(null.get("error")), "rows": [], "overlap": None, "n_shared": 0}
    if not isinstance(null, dict) or not null.get("results"):
        return None
    shared = {str(c) for c in null.get("shared") or []}
    both = {clip_key(r) for r in q.get("results", [])} & {clip_key(r) for r in null["results"]}
    shared |= both  # `shared` from the JSON, else the ids both lists hold

    def cell(r: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if r is None else {**r, "shared": clip_key(r) in shared}

    res, nul = q.get("results", []), null["results"]
    rows = [
        {"rank": i + 1, "captioned": cell(res[i] if i < len(res) else None),
         "null": cell(nul[i] if i < len(nul) else None)}
        for i in range(max(len(res), len(nul)))
    ]  # fmt: skip
    overlap = _finite(null.get("top_k_overlap"))
    return {"error": None, "rows": rows, "overlap": overlap, "n_shared": len(both)}


# The reading line: plain-words facts of one query, computed from its JSON so a reader can judge a
# ranking before looking at the charts. Every fact is optional: a query without `se`, `null_prompt`
# or `explain.by_kind` gets fewer sentences (an old JSON the caption-word one only).

TOP = 5  # the reading speaks of the top 5 (or all results when fewer): what a reader looks at first

# English function words plus the filler of video captions ("video", "clip", "shot"): sharing one of
# them says nothing about what a clip shows.
STOP_WORDS = frozenset(
    """a an the and or but nor of in on at to from by for with without over under into onto off up down
    out about above below between through across along around after before behind beside near far is
    are was were be been being am it its this that these those there here he she they them his her
    their we you i me my our your as than then so such very too also just not no yes do does did has
    have had will would can could may might shall should must while when where which who whom whose
    what how all any each both few more most other some own same only video clip shot scene footage
    image frame frames""".split()
)
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (any script); punctuation and _ split words


def content_words(text: str | None) -> set[str]:
    """The content words of a text: maximal runs of Unicode letters/digits, casefolded, minus
    STOP_WORDS and single characters. None or "" gives the empty set."""
    if not text:
        return set()
    return {w for w in _WORD.findall(text.casefold()) if len(w) > 1 and w not in STOP_WORDS}


def shared_words(prompt: str | None, caption: str | None) -> set[str]:
    """The words a result's caption shares with the query's prompt.

    A result *shares the prompt's caption words* when this set is non-empty: its caption and the
    prompt have at least one content word in common, exactly (same casefolded word, no stemming:
    "dog" and "dogs" differ), with stop words and one-character words ignored (`content_words`)."""
    return content_words(prompt) & content_words(caption)


def _se(r: dict[str, Any]) -> float | None:
    se = r.get("se")
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) and se >= 0 else None


def settled_gaps(results: list[dict[str, Any]], n: int) -> tuple[int, int] | None:
    """(settled, gaps) over the top n's n − 1 steps from one rank to the next: a step is settled when
    score_i − score_{i+1} > se_gap_i, the standard error of that difference itself (`score` writes
    it when it has per-draw terms). Shared draws move neighbours together, so a gap can be sure while
    the two error bars overlap. None when one of those n − 1 results has no se_gap."""
    gaps = [_finite(r.get("se_gap")) for r in results[: n - 1]]
    if n < 2 or len(results) < n or any(g is None for g in gaps):
        return None
    settled = sum(a["score"] - b["score"] > g for a, b, g in zip(results, results[1:n], gaps))
    return settled, n - 1


def indistinct_top(results: list[dict[str, Any]]) -> int | None:
    """The largest m ≥ 2 such that the top m results' error bars [score − se, score + se] all overlap
    (max of the lower ends ≤ min of the upper ends: on a line, pairwise overlap is a common point),
    so their order is not settled by the scores; 1 when rank 1's and rank 2's bars are apart; None
    when rank 1 or 2 has no se. Results are read in rank order; the first without se ends the run."""
    if len(results) < 2 or _se(results[0]) is None or _se(results[1]) is None:
        return None
    lo, hi, m = -math.inf, math.inf, 0
    for r in results:
        se = _se(r)
        if se is None:
            break
        lo, hi = max(lo, r["score"] - se), min(hi, r["score"] + se)
        if lo > hi:
            break
        m += 1
    return max(m, 1)


def clip_key(r: dict[str, Any]) -> str:
    """A result's clip as text: its clip id (int64 in rows, int or string in a `shared` list, so
    compared as text), the vid for a row without one."""
    return str(r.get("clip_id_str") or r.get("clip_id") or r.get("vid"))


def null_kept(results: list[dict[str, Any]], null_results: list[dict[str, Any]], n: int) -> int:
    """How many of the captioned top n are also in the null-prompt top n (clip ids compared)."""
    return len({clip_key(r) for r in results[:n]} & {clip_key(r) for r in null_results[:n]})


def cross_share(results: list[dict[str, Any]]) -> float | None:
    """Cross-attention's share of the results' summed score, Σ by_kind.cross_attention / Σ score:
    how much of the ranking flows through the caption's path rather than the video's. None when a
    result lacks by_kind or the summed score is not positive (a share of a non-positive sum reads
    backwards)."""
    kinds = [(r.get("explain") or {}).get("by_kind") for r in results]
    total = sum(r["score"] for r in results)
    if not results or any(not k for k in kinds) or total <= 0:
        return None
    return sum(_finite(k.get("cross_attention")) or 0.0 for k in kinds) / total


def reading(query: dict[str, Any]) -> list[str]:
    """The plain-words sentences of one scored query (empty for a failed one or no results)."""
    results = query.get("results") or []
    if query.get("status", "ok") != "ok" or not results:
        return []
    n = min(TOP, len(results))
    top = f"top {n}"
    out = []
    if content_words(query.get("prompt")):
        shares = [shared_words(query.get("prompt"), r.get("caption")) for r in results[:n]]
        c = sum(bool(s) for s in shares)
        counts = Counter(w for s in shares for w in s)
        words = sorted(counts, key=lambda w: (-counts[w], w))[:3]  # the most shared, ties alphabetical
        out.append(f"{c} of the {top} share a caption word with the prompt"
                   + (f" ({', '.join(words)})" if words else ""))  # fmt: skip
    m = indistinct_top(results)
    gaps = settled_gaps(results, n)
    if m == 1:
        out.append("rank 1 stands apart from rank 2 beyond their error bars (± se)")
    elif m is not None and gaps is None:
        out.append(f"the top {m} cannot be told apart within their error bars (± se)")
    elif m is not None:  # overlapping bars say little when the same draws move all scores together
        out.append(f"the top {m}'s error bars (± se) overlap, but shared draws move them together")
    if gaps is not None:
        # the gap's own se, not the two bars: shared draws move neighbours together
        verb = "exceeds its" if gaps[0] == 1 else "exceed their"
        out.append(f"{gaps[0]} of the {gaps[1]} steps between the {top} {verb} own se (se_gap)")
    null = query.get("null_prompt")
    if isinstance(null, dict) and null.get("results"):
        out.append(f"the null-prompt ranking keeps {null_kept(results, null['results'], n)} of the {top}")
    share = cross_share(results[:n])
    if share is not None:
        out.append(f"cross-attention (the caption's path) carries {share:.0%} of the {top}'s summed score")
    return out


MAX_FRAMES = 81  # frames decoded per clip at most (Wan2.1's longest clip): the strip shows --frames of them
THUMB_SIDE = 256  # px: a thumbnail's longer side at most, whatever size the run encoded at
NOT_IN_RUN = "not in run"


def thumb_policy(enc: Any) -> FramePolicy:
    """The report's own frame policy from a recorded one (the run's latents record, else the JSON's
    `index.encode`): the same frame selection (count, fps, pad_short) and aspect, clamped to
    MAX_FRAMES frames and THUMB_SIDE px, so a clip's decode takes at most 81 x 256 x 256 x 3 bytes
    (16 MB) whatever the record says. Missing or unusable values take the encode defaults."""

    def get(name: str, default: Any) -> Any:
        v = enc.get(name, default) if isinstance(enc, dict) else getattr(enc, name, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return v if ok else default

    frames = min(max(int(get("frames", 17)), 1), MAX_FRAMES)
    h, w = max(int(get("height", 64)), 1), max(int(get("width", 64)), 1)
    scale = min(1.0, THUMB_SIDE / max(h, w))
    h, w = max(round(h * scale), 1), max(round(w * scale), 1)
    fps = min(max(float(get("fps", 8.0)), 0.0), 1000.0)
    pad = enc.get("pad_short", False) if isinstance(enc, dict) else getattr(enc, "pad_short", False)
    return FramePolicy(frames=frames, height=h, width=w, fps=fps, pad_short=pad is True)


@functools.cache
def report_schema() -> dict[str, Any]:
    """The attribution schema as the report checks it: the document needs `index` and `queries` only
    and any `schema_version` (older and hand-made JSONs render, less what they lack), the provenance
    may be partial; every value present keeps the schema's type and range."""
    from importlib import resources

    text = resources.files("carv_attrib").joinpath("schemas/attribution.schema.json").read_text("utf-8")
    schema = copy.deepcopy(json.loads(text))
    schema["required"] = ["index", "queries"]
    props = schema["properties"]
    props["schema_version"] = {"type": "string"}
    props["index"] = {k: v for k, v in props["index"].items() if k != "required"}
    return schema


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def check_document(doc: Any, name: str) -> None:
    """UsageError (one line naming the field) unless `doc` is an attribution document the report can
    render: the schema (`report_schema`), and every number finite (Python's JSON reader lets NaN and
    Infinity through)."""
    import jsonschema
    from jsonschema.exceptions import best_match

    if not isinstance(doc, dict) or "queries" not in doc or "index" not in doc:
        raise UsageError(f"{name}: not an attribution JSON from `carv-attrib score`")
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:  # iterative: a deep document cannot overflow the stack here
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{name}: {_field(path)}: {v} is not a finite number")
        if isinstance(v, dict):
            stack += [((*path, k), x) for k, x in reversed(v.items())]
        elif isinstance(v, list):
            stack += [((*path, i), x) for i, x in reversed(list(enumerate(v)))]
    validator = jsonschema.Draft202012Validator(report_schema())
    err = best_match(validator.iter_errors(doc))
    if err is not None:
        msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        raise UsageError(f"{name}: {_field(err.absolute_path)}: {msg}")


def _read(cfg: ReportConfig) -> dict[str, Any]:
    try:
        doc = json.loads(Path(cfg.attribution).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"{cfg.attribution}: not a readable attribution JSON ({first})") from None
    check_document(doc, str(cfg.attribution))
    return doc


def _run_clips(cfg: ReportConfig, doc: dict[str, Any]) -> tuple[RunDir, dict[int, str], FramePolicy]:
    """The run whose clips the page may show (--run, else the JSON's `run`), clip_id -> path from its
    manifest, and the thumbnail policy from its latents record (the JSON's when it has none)."""
    import pyarrow.parquet as pq

    fix = "give --run RUN, or --frames 0 for a page without frames"
    named = cfg.run if cfg.run is not None else doc.get("run")
    if not named:
        raise UsageError(f"{cfg.attribution} names no run to take the clips' frames from; {fix}")
    run = RunDir(named)
    if not run.manifest_table.is_file():
        raise UsageError(f"{run}: not a run (no {run.manifest_table.name} under manifest/); {fix}")
    try:
        table = pq.read_table(run.manifest_table, columns=["clip_id", "path"])
        clips = dict(zip(table.column("clip_id").to_pylist(), table.column("path").to_pylist()))
    except Exception as exc:  # a damaged parquet file: pyarrow raises ArrowInvalid, OSError, ...
        raise UsageError(f"{run.manifest_table}: unreadable ({type(exc).__name__}); {fix}") from None
    try:
        rec = run.latents_record()
        enc = rec.encode if rec is not None and rec.encode is not None else doc["index"].get("encode", {})
    except Exception:  # an unreadable record: the JSON's policy, clamped all the same
        enc = doc["index"].get("encode", {})
    return run, clips, thumb_policy(enc)


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def run_report(cfg: ReportConfig) -> Path:
    """Render cfg.attribution to cfg.out (atomically). UsageError (exit 2) for a file that is not a
    valid attribution JSON, and, unless --frames 0, for a JSON whose run (or --run) is not there; a
    clip that cannot be decoded shows its failure in place of its frames, a result the run does not
    hold shows "not in run" (never opened)."""
    cfg.validate()
    doc = _read(cfg)
    run, clips, policy = _run_clips(cfg, doc) if cfg.frames else (None, {}, thumb_policy({}))
    decoded: dict[str, tuple[str | None, str | None]] = {}  # one decode per distinct file

    def strip(path: str) -> tuple[str | None, str | None]:
        key = os.path.realpath(path)
        if key not in decoded:
            try:
                decoded[key] = frame_strip(path, policy, cfg.frames), None
            except ClipFailure as exc:
                decoded[key] = None, f"{exc.kind}: {exc}"
        return decoded[key]

    outside = 0

    def result_strip(r: dict[str, Any]) -> tuple[str | None, str | None]:
        nonlocal outside
        if not cfg.frames:
            return None, None
        known = clips.get(r["clip_id"])
        if known is None or (r.get("path") is not None and not _same_path(r["path"], known)):
            outside += 1  # the JSON names a file the run does not: not opened
            return None, NOT_IN_RUN
        return strip(known)

    queries = []
    for q in doc["queries"]:
        # the query is the user's own video: shown when it is a regular file (no FIFO, no directory)
        path = q.get("path")
        q_strip = strip(path)[0] if cfg.frames and path and os.path.isfile(path) else None
        rows = q.get("results", [])
        results = []
        for r, charts in zip(rows, query_charts(rows)):
            s, err = result_strip(r)
            results.append({**r, "strip": s, "strip_error": err, **charts})
        queries.append({**q, "strip": q_strip, "results": results, "reading": reading(q),
                        "null": null_view(q), "why": any(r["splits"] or r["kinds"] for r in results),
                        "has_se": any(_finite(r.get("se")) is not None for r in rows),
                        "has_p": any(_finite(r.get("p_top_k")) is not None for r in rows)})  # fmt: skip
    warnings = list(doc.get("warnings", []))
    if outside:
        total = sum(len(q.get("results", [])) for q in doc["queries"])
        note = (f"{outside} of {total} results name a clip that is not in the run {run} (or a path its "
                "manifest does not give it): shown without frames, not opened")  # fmt: skip
        log.warning("%s", note)
        warnings.append(note)
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
        warnings=warnings,
        queries=queries,
        aggregate=doc.get("aggregate"),
        provenance=json.dumps(doc["index"], indent=2, ensure_ascii=False),
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
