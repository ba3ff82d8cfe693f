"""pipeline/report.py's reading line and chart geometry, on hand-made query dicts (no run, no
decode, no browser): the reading line's facts and the shared axes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from carv_attrib.config import ReportConfig
from carv_attrib.pipeline.report import (
    Axis,
    column_chart,
    content_words,
    cross_share,
    indistinct_top,
    kind_axis,
    kind_chart,
    null_kept,
    null_view,
    query_charts,
    reading,
    run_report,
    settled_gaps,
    shared_words,
)


def row(rank: int, score: float, caption: str | None = "", se: float | None = None, **extra: Any) -> dict:
    r = {"rank": rank, "clip_id": 100 + rank, "clip_id_str": str(100 + rank), "vid": f"v{rank}",
         "caption": caption, "path": None, "score": score, **extra}  # fmt: skip
    return r if se is None else {**r, "se": se}


def test_content_words_casefold_and_drop_stop_words_and_punctuation() -> None:
    assert content_words("A Dog runs on the BEACH, at sunset!") == {"dog", "runs", "beach", "sunset"}
    assert content_words("the video of a clip") == set()  # stop words and caption filler only
    assert content_words(None) == set() and content_words("") == set()
    assert content_words("x y 4k") == {"4k"}  # one-character words say nothing
    assert content_words("<script>alert(1)</script>") == {"script", "alert"}


def test_share_means_one_exact_content_word_in_common() -> None:
    assert shared_words("a dog on a beach", "Dogs at the BEACH") == {"beach"}  # no stemming: dog ≠ dogs
    assert shared_words("a dog", "a cat") == set()
    assert shared_words("a dog", None) == set()


def test_the_caption_sentence_counts_the_top_five() -> None:
    captions = ["a red square", "a blue circle moving left", "green", None, "the end", "a red circle"]
    results = [row(i + 1, 0.9 - i / 10, c) for i, c in enumerate(captions)]
    q = {"prompt": "a red circle moving up", "status": "ok", "results": results}
    assert reading(q) == ["2 of the top 5 share a caption word with the prompt (circle, moving, red)"]
    q["prompt"] = "the"  # no content word in the prompt: nothing to share, no sentence
    assert reading(q) == []
    assert reading({"prompt": "x", "status": "error", "results": []}) == []


def test_indistinct_top_is_the_longest_prefix_whose_bars_share_a_point() -> None:
    # bars: [0.8, 1.0], [0.75, 0.95], [0.7, 0.9] share [0.8, 0.9]; the 4th [0.3, 0.5] is apart
    rs = [row(1, 0.9, se=0.1), row(2, 0.85, se=0.1), row(3, 0.8, se=0.1), row(4, 0.4, se=0.1)]
    assert indistinct_top(rs) == 3
    # pairwise overlap of 1-2 and 2-3 is not enough: 1 [0.9, 1.1] and 3 [0.5, 0.7] are apart
    assert indistinct_top([row(1, 1.0, se=0.1), row(2, 0.8, se=0.15), row(3, 0.6, se=0.1)]) == 2
    assert indistinct_top([row(1, 1.0, se=0.01), row(2, 0.5, se=0.01)]) == 1
    assert indistinct_top([row(1, 1.0), row(2, 0.9)]) is None  # no se: nothing said
    assert indistinct_top([row(1, 1.0, se=0.1), row(2, 0.95, se=0.1), row(3, 0.9)]) == 2  # stops at no se
    assert indistinct_top([row(1, 1.0, se=0.1)]) is None
    q = {"prompt": "", "results": rs}
    assert reading(q) == ["the top 3 cannot be told apart within their error bars (± se)"]
    q["results"] = [row(1, 1.0, se=0.01), row(2, 0.5, se=0.01)]
    assert reading(q) == ["rank 1 stands apart from rank 2 beyond their error bars (± se)"]


def test_null_prompt_kept_and_cross_attention_share() -> None:
    rs = [row(i, 1.0 - i / 10, explain={"by_kind": {"self_attention": 0.5, "cross_attention": 0.1,
                                                      "feed_forward": 0.3, "other": 0.0}})
          for i in range(1, 8)]  # fmt: skip
    null = [row(3, 0.9), row(9, 0.8), row(1, 0.7), row(10, 0.6), row(11, 0.5), row(2, 0.4)]
    assert null_kept(rs, null, 5) == 2  # clips 1 and 3 (2 is 6th in the null ranking)
    assert cross_share(rs[:1]) == pytest.approx(0.1 / 0.9)
    assert cross_share([row(1, 0.5)]) is None  # no by_kind
    assert cross_share([row(1, -0.5, explain={"by_kind": {"cross_attention": 0.1}})]) is None
    q = {"prompt": "", "results": rs, "null_prompt": {"results": null, "top_k_overlap": 3 / 7, "shared": []}}
    share = sum(0.1 for _ in range(5)) / sum(r["score"] for r in rs[:5])
    assert reading(q) == [
        "the null-prompt ranking keeps 2 of the top 5",
        f"cross-attention (the caption's path) carries {share:.0%} of the top 5's summed score",
    ]
    view = null_view(q)
    assert view is not None and view["n_shared"] == 3 and len(view["rows"]) == 7
    assert [r["captioned"]["shared"] for r in view["rows"]] == [True, True, True, False, False, False, False]
    assert view["rows"][6]["null"] is None
    assert null_view({"results": rs}) is None
    failed = {"status": "error", "error": "non-finite", "results": [], "top_k_overlap": None, "shared": []}
    assert null_view({"results": rs, "null_prompt": failed})["error"] == "non-finite"
    assert not any("null-prompt" in x for x in reading({"prompt": "", "results": rs, "null_prompt": failed}))


def test_one_query_shares_one_axis_per_chart_kind() -> None:
    big = {"by_block": {"blocks.0": 3.0, "blocks.1": -1.0}, "by_kind": {"self_attention": 2.0,
           "cross_attention": 0.5, "feed_forward": 0.0, "other": -0.5}}  # fmt: skip
    small = {"by_block": {"blocks.0": 0.3, "blocks.1": 0.1}, "by_kind": {"self_attention": 0.2,
             "cross_attention": 0.1, "feed_forward": 0.1, "other": 0.0}}  # fmt: skip
    charts = query_charts([row(1, 2.0, se=0.5, explain=big), row(2, 0.4, explain=small)])
    c1, c2 = (c["splits"][0] for c in charts)
    assert c1["zero"] == c2["zero"]  # one zero line
    h1, h2 = c1["bars"][0]["h"], c2["bars"][0]["h"]
    assert h1 / h2 == pytest.approx(3.0 / 0.3, rel=0.02)  # heights on one scale, not each row's own
    assert [m["text"] for m in c2["marks"]] == ["3", "0", "-1"]  # the query's axis written on each chart
    assert c2["write_values"] and c2["bars"][0]["text"] == "0.3"
    k1, k2 = (c["kinds"] for c in charts)
    assert k1["zero"] == k2["zero"] and (k1["lo"], k1["hi"]) == ("-0.5", "2.5")
    assert sum(s["w"] for s in k1["segs"]) > 4 * sum(s["w"] for s in k2["segs"])
    f1, f2 = (c["forest"] for c in charts)
    assert f1["x1"] < f1["cx"] < f1["x2"] and "x1" not in f2 and f2["cx"] < f1["x1"]
    assert charts[1]["splits"] and query_charts([row(1, 1.0)])[0] == {
        "splits": [], "kinds": None, "forest": query_charts([row(1, 1.0)])[0]["forest"]}  # fmt: skip


def test_axis_and_chart_edge_cases() -> None:
    assert Axis.over([]).frac(0.0) == pytest.approx(0.5)  # nothing to scale: still maps
    assert Axis.over([2.0, 2.0], zero=False).frac(2.0) == pytest.approx(0.5)
    c = column_chart("t", [(f"b{i}", f"b{i}", float(i)) for i in range(30)], Axis.over(range(30)))
    assert not c["write_values"] and not c["ticks"]  # 30 columns of 14.7 px: hover titles only
    assert c["w"] == 44 + 440
    k = kind_chart({"self_attention": 1.0}, kind_axis([{"self_attention": 1.0}]))
    assert [s["css"] for s in k["segs"]] == ["k-self"] and k["total"] == "1"


def test_a_partial_or_null_by_kind_draws_what_it_has() -> None:
    rs = [row(1, 1.0, explain={"by_kind": {"self_attention": 0.8, "cross_attention": None}}),
          row(2, 0.9, explain={"by_kind": {}})]  # fmt: skip
    charts = query_charts(rs)
    assert [s["css"] for s in charts[0]["kinds"]["segs"]] == ["k-self"] and charts[1]["kinds"] is None
    assert cross_share(rs[:1]) == 0.0 and cross_share(rs) is None  # rank 2 has no split


def test_a_step_is_settled_by_its_own_se_gap_though_the_bars_overlap() -> None:
    rs = [row(1, 1.0, se=0.5, se_gap=0.01), row(2, 0.98, se=0.5, se_gap=0.05), row(3, 0.95, se=0.5)]
    assert settled_gaps(rs, 3) == (1, 2)  # 0.02 > 0.01 settled; 0.03 < 0.05 not
    assert settled_gaps(rs, 2) == (1, 1) and settled_gaps(rs[:2], 3) is None
    assert settled_gaps([row(1, 1.0), row(2, 0.9)], 2) is None  # no se_gap: nothing said
    assert reading({"prompt": "", "results": rs}) == [
        "the top 3's error bars (± se) overlap, but shared draws move them together",
        "1 of the 2 steps between the top 3 exceeds its own se (se_gap)",
    ]


def test_a_minimal_document_renders_old_and_new_shapes(tmp_path: Path) -> None:
    """run_report on a hand-made document (no frames): the older shape gets none of the new elements,
    a failed null pass shows its error as text."""
    old = {"path": "q.mp4", "prompt": "a red circle", "status": "ok", "results": [row(1, 0.5, "a red dot")]}
    failed = {
        "status": "error",
        "error": "<i>non-finite</i>",
        "results": [],
        "top_k_overlap": None,
        "shared": [],
    }
    new = {**old, "results": [row(1, 0.5, "a red dot", se=0.1, p_top_k=0.7)], "null_prompt": failed}
    for name, q in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"index": {}, "queries": [q]}))
        run_report(
            ReportConfig(attribution=tmp_path / f"{name}.json", out=tmp_path / f"{name}.html", frames=0)
        )
    # the body only: the stylesheet names every class
    html_old, html_new = ((tmp_path / f"{n}.html").read_text().split("<body>")[1] for n in ("old", "new"))
    assert 'class="reading"' in html_old and "1 of the top 1 share a caption word" in html_old
    for absent in ('class="whisker"', "P(top-k)", "null prompt", 'class="kinds"', "± se"):
        assert absent not in html_old
    assert (
        "null prompt not scored: &lt;i&gt;non-finite&lt;/i&gt;" in html_new and 'class="whisker"' in html_new
    )
