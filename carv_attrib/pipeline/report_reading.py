"""The report's one-line reading of a query: plain-words facts computed from its attribution JSON, so a
reader can judge a ranking before looking at the charts.

    reading(query)  # ["3 of the top 5 share a caption word with the prompt (dog, beach)", ...]

Every fact is optional: a query without `se`, `null_prompt` or `explain.by_kind` simply gets fewer
sentences (an old JSON gets the caption-word one only). Nothing here decodes or renders; the report
escapes the strings like any other text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

__all__ = [
    "STOP_WORDS",
    "TOP",
    "content_words",
    "shared_words",
    "indistinct_top",
    "clip_key",
    "null_kept",
    "cross_share",
    "reading",
]

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
    return sum(k.get("cross_attention", 0.0) for k in kinds) / total


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
    if m == 1:
        out.append("rank 1 stands apart from rank 2 beyond their error bars (± se)")
    elif m is not None:
        out.append(f"the top {m} cannot be told apart within their error bars (± se)")
    null = query.get("null_prompt")
    if isinstance(null, dict) and null.get("results"):
        out.append(f"the null-prompt ranking keeps {null_kept(results, null['results'], n)} of the {top}")
    share = cross_share(results[:n])
    if share is not None:
        out.append(f"cross-attention (the caption's path) carries {share:.0%} of the {top}'s summed score")
    return out
