"""The attribution JSON's newer optional fields, for the report tests: taken out of a query (an older
JSON, whether or not this `score` writes them) or made up from its real results (a newer one)."""

from __future__ import annotations

NEWER_QUERY = ("uncertainty", "null_prompt", "conditioning")
NEWER_RESULT = ("se", "se_gap", "p_top_k")


def as_older(q: dict) -> None:
    """The query as a JSON from before those fields (whether or not this `score` writes them)."""
    for key in NEWER_QUERY:
        q.pop(key, None)
    for r in q["results"]:
        for key in NEWER_RESULT:
            r.pop(key, None)
        r.get("explain", {}).pop("by_kind", None)


def inject_newer_fields(q: dict) -> None:
    """The fields `score` is gaining (se, p_top_k, explain.by_kind, uncertainty, null_prompt), made up
    from the query's real results: by_kind splits each score over the four kinds, the null-prompt
    ranking is the results reversed (so it keeps some), one of its vids hostile."""
    as_older(q)  # the made-up values replace whatever this `score` wrote
    rs = q["results"]
    spread = (rs[0]["score"] - rs[-1]["score"]) or 1e-3
    q["uncertainty"] = {"method": "cheap", "formula": "iid", "draws": 4, "dof": 3, "level": 0.9, "t": 2.353,
                        "clip_side": "mirrored"}  # fmt: skip
    for i, r in enumerate(rs):
        r["se"], r["p_top_k"] = spread * 0.6, 1.0 - i / len(rs)
        s = r["score"]
        r["explain"]["by_kind"] = {"self_attention": 0.6 * s, "cross_attention": 0.25 * s,
                                   "feed_forward": 0.2 * s, "other": -0.05 * s}  # fmt: skip
    null = [{**r, "rank": i + 1} for i, r in enumerate(reversed(rs))][:-1]
    null[0] = {**null[0], "vid": "<img src=x onerror=alert(3)>"}
    q["null_prompt"] = {"status": "ok", "results": null, "top_k_overlap": len(null) / len(rs),
                        "shared": [r["clip_id"] for r in null],
                        "shared_str": [r["clip_id_str"] for r in null]}  # fmt: skip
