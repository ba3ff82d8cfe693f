"""score's standard errors, p_top_k and --refine end to end on the small featurized run (K = 4
stratified-is draws, cosine index): every result carries them, --explain makes the clip side exact,
--refine spends at most its budget and says so, and the options that cannot go together are refused."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from carv_attrib.errors import UsageError
from carv_attrib.pipeline.score import ScoreConfig, default_refine_budget, run_score


def _schema() -> dict:
    return json.loads(resources.files("carv_attrib").joinpath("schemas/attribution.schema.json").read_text())


def _query(featurized_run: Path, demo_data: Path, **kw) -> dict:
    vid = "demo-00003"
    caption = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}[vid]
    cfg = ScoreConfig(
        run=featurized_run, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=caption, device="cpu", **kw
    )
    doc = run_score(cfg)
    jsonschema.validate(doc, _schema())
    return doc["queries"][0]


def test_every_result_has_a_standard_error_and_a_top_k_probability(
    featurized_run: Path, demo_data: Path
) -> None:
    q = _query(featurized_run, demo_data, top_k=3)
    assert q["uncertainty"]["method"] == "cheap" and q["uncertainty"]["clip_side"] == "mirrored"
    assert q["uncertainty"]["draws"] == 4 and q["uncertainty"]["dof"] == 2
    for r in q["results"]:
        assert r["se"] > 0 and r["se_gap"] >= 0 and 0.0 <= r["p_top_k"] <= 1.0


def test_explain_recomputes_the_clip_side(featurized_run: Path, demo_data: Path) -> None:
    q = _query(featurized_run, demo_data, top_k=3, explain=True)
    assert q["uncertainty"]["method"] == "exact" and q["uncertainty"]["recomputed"] == 3
    assert all(r["se"] > 0 for r in q["results"])


def test_refine_spends_at_most_its_budget_and_reports_it(featurized_run: Path, demo_data: Path) -> None:
    q = _query(featurized_run, demo_data, top_k=3, refine=True)
    refine = q["uncertainty"]["refine"]
    assert q["uncertainty"]["method"] == "refined"
    assert refine["budget"] == default_refine_budget(3, 4) and 0 <= refine["draws"] <= refine["budget"]
    assert refine["draws_per_clip"] == 4 * 2 ** refine["rounds"]
    scores = [r["score"] for r in q["results"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in q["results"]] == [1, 2, 3]
    assert q["results"][0]["vid"] == "demo-00003"  # the clip itself stays first
    small = _query(featurized_run, demo_data, top_k=3, refine=True, refine_budget=0)["uncertainty"]["refine"]
    assert small["draws"] == 0 and small["rounds"] == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"refine": True, "explain": True, "top_k": 3}, "--refine and --explain"),
        ({"refine_budget": 10, "top_k": 3}, "--refine-budget needs --refine"),
        ({"refine": True, "top_k": None}, "--refine settles a top-k"),
        ({"refine": True, "refine_budget": -1, "top_k": 3}, "--refine-budget -1"),
    ],
)
def test_refine_options_that_cannot_go_together_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ScoreConfig(run=Path("r"), queries=[Path("q.mp4")], prompt="p", **kw).validate()


def test_refine_is_refused_on_a_trak_index(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    """TRAK's preconditioner is fitted on the index's own features; a refined one leaves their span
    (bench/score_se.py measured recall 0.55 against 0.98), so score refuses before encoding a query."""
    import shutil

    from carv_attrib.pipeline.index import IndexConfig, build_run_index

    run = tmp_path / "trak"
    shutil.copytree(featurized_run, run)
    build_run_index(IndexConfig(run=run, precondition="trak"))
    with pytest.raises(UsageError, match="--refine with a trak index"):
        _query(run, demo_data, top_k=3, refine=True)
