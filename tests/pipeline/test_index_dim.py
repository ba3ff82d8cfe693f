"""`index --index-dim D'`: a sketched index, queries sketched alike, mismatches refused, explain exact."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.pipeline.index import IndexConfig, build_run_index, index_config_keeping
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.search.index import load_index
from carv_attrib.search.precondition import load_preconditioner
from carv_attrib.search.sketch import Sketch, SketchSpec
from carv_attrib.store.digests import doc_digest
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.run import RunDir


def _caption(demo_data: Path, vid: str) -> str:
    return {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}[vid]


@pytest.fixture(scope="module")
def sketched_run(featurized_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the featurized run indexed cosine with --index-dim D/2 through the CLI."""
    run = tmp_path_factory.mktemp("sketched") / "run"
    shutil.copytree(featurized_run, run)
    dim = RunDir(run).index_info().dim
    r = CliRunner().invoke(app, ["index", str(run), "--precondition", "cosine", "--index-dim", str(dim // 2)])
    assert r.exit_code == 0, r.output
    return run


def _score(run: Path, demo_data: Path, vid: str, **kw) -> dict:
    cfg = ScoreConfig(
        run=run,
        queries=[demo_data / "videos" / f"{vid}.mp4"],
        prompt=_caption(demo_data, vid),
        device="cpu",
        **kw,
    )
    doc = run_score(cfg)
    jsonschema.validate(
        doc,
        json.loads(resources.files("carv_attrib").joinpath("schemas/attribution.schema.json").read_text()),
    )
    assert doc["index"]["index_dim"] == doc["index"]["sketch"]["out_dim"] < doc["index"]["dim"]
    return doc["queries"][0]


def test_the_index_holds_the_sketched_preconditioned_features(sketched_run: Path) -> None:
    run = RunDir(sketched_run)
    info = run.index_info()
    d2 = info.dim // 2
    assert info.sketch is not None and info.sketch["kind"] == "srht"
    assert (info.sketch["dim"], info.sketch["out_dim"], info.sketch["seed"]) == (info.dim, d2, 0)
    assert f"--index-dim {d2}" in info.rebuild_command(sketched_run)
    index = load_index(run.faiss_path)
    assert index.d == d2 and index.ntotal == info.count
    ids, feats = feature_matrix(sketched_run)
    pre = load_preconditioner(run.preconditioner_dir)
    want = Sketch(SketchSpec("srht", info.dim, d2, 0)).apply(pre.prepare_train(feats))
    got = np.stack([index.reconstruct(int(i)) for i in ids])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_training_clip_still_retrieves_itself_first(sketched_run: Path, demo_data: Path) -> None:
    for vid in ("demo-00002", "demo-00005"):
        q = _score(sketched_run, demo_data, vid, top_k=3)
        top = q["results"][0]
        assert top["vid"] == vid and top["rank"] == 1
        # cosine: ‖Su‖² for a unit u, unbiased for 1 with an error of about sqrt(2/D')
        assert top["score"] == pytest.approx(1.0, abs=0.5)
        assert all(r["se"] is not None for r in q["results"])  # the cheap se reads the stored features


def test_explain_splits_the_uncompressed_score_exactly(sketched_run: Path, demo_data: Path) -> None:
    q = _score(sketched_run, demo_data, "demo-00002", top_k=2, explain=True)
    for r in q["results"]:
        ex = r["explain"]
        assert sum(v for v in ex["by_block"].values()) == pytest.approx(ex["total"], abs=1e-9)
        assert ex["uncompressed_score"] == ex["total"]
        assert ex["sketch_error"] == pytest.approx(r["score"] - ex["total"], abs=1e-12)
        assert abs(ex["by_stratum_residual"]) < 1e-4  # the strata add up to the uncompressed score
    assert q["results"][0]["explain"]["total"] == pytest.approx(1.0, abs=1e-4)  # cos(φ, φ): exact
    assert q["uncertainty"]["method"] == "exact"


def test_score_refuses_a_sketch_it_does_not_reproduce(
    sketched_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(sketched_run, run)
    path = RunDir(run).index_info_path
    doc = json.loads(path.read_text())
    doc.pop("digest")
    doc["sketch"]["seed"] = 1  # another sketch than the one the vectors went through
    path.write_text(json.dumps(doc | {"digest": doc_digest(doc)}))
    with pytest.raises(ConfigMismatchError, match="does not reproduce"):
        _score(run, demo_data, "demo-00002", top_k=1)
    doc["sketch"] = None  # a record without the sketch: queries of D against an index of D'
    path.write_text(json.dumps(doc | {"digest": doc_digest(doc)}))
    with pytest.raises(ConfigMismatchError, match="FAISS index holds d"):
        _score(run, demo_data, "demo-00002", top_k=1)


def test_refine_and_an_index_dim_at_or_above_d_are_refused(sketched_run: Path, demo_data: Path) -> None:
    with pytest.raises(UsageError, match="--refine with an index built with --index-dim"):
        _score(sketched_run, demo_data, "demo-00002", top_k=1, refine=True)
    dim = RunDir(sketched_run).index_info().dim
    with pytest.raises(UsageError, match="below the feature dim"):
        build_run_index(IndexConfig(run=sketched_run, index_dim=dim))
    with pytest.raises(UsageError, match="--index-dim -1"):
        IndexConfig(run=sketched_run, index_dim=-1).validate()


def test_featurize_keeps_the_index_dim_and_zero_drops_it(sketched_run: Path) -> None:
    d2 = RunDir(sketched_run).index_info().sketch["out_dim"]
    cfg, kept = index_config_keeping(sketched_run, {})
    assert cfg.index_dim == d2 and kept["--index-dim"] == d2
    cfg, _ = index_config_keeping(sketched_run, {"index_dim": 0})
    assert cfg.index_dim == 0
