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


def test_queries_go_through_the_index_sketch(sketched_run: Path, demo_data: Path) -> None:
    """A training clip as the query: its feature is the stored one (same encode, same draws), so
    the ranking is the brute-force one of ⟨S·pre(φ_q), S·pre(φ_i)⟩, and its own score is ‖S u‖²
    (cosine: u unit), an unbiased estimate of 1 with sd sqrt(2/D') at most."""
    run = RunDir(sketched_run)
    info = run.index_info()
    ids, feats = feature_matrix(sketched_run)
    pre = load_preconditioner(run.preconditioner_dir)
    sk = Sketch(SketchSpec("srht", info.dim, info.sketch["out_dim"], 0))
    for vid in ("demo-00002", "demo-00005"):
        q = _score(sketched_run, demo_data, vid, top_k=8)
        got = [r["clip_id"] for r in q["results"]]
        me = next(r for r in q["results"] if r["vid"] == vid)["clip_id"]
        phi = feats[list(ids).index(me)][None]
        brute = sk.apply(pre.prepare_train(feats)).astype(np.float64) @ sk.apply(pre.prepare_query(phi))[0]
        assert got == [int(ids[i]) for i in np.argsort(-brute, kind="stable")]
        own = next(r["score"] for r in q["results"] if r["clip_id"] == me)
        assert abs(own - 1.0) < 4 * np.sqrt(2 / info.sketch["out_dim"])
        assert all(r["se"] is not None for r in q["results"])  # the cheap se reads the stored features


def test_self_retrieval_where_the_margin_allows(sketched_run: Path) -> None:
    """Top-1 self-retrieval survives a sketch when the clip's margin over its nearest rival exceeds
    the sketch's error on that difference, ‖q‖‖t_i − t_j‖/√D'. The fixture's clips (a random tiny
    model) are nearly collinear: cosine to the nearest other clip 1 − 1e-4, margins ~0.007 of that
    error scale, so no D' below D keeps them apart and the sketched index ranks them by chance (the
    README says so). Synthetic clips with the fixture's D and a margin of 4 errors at D' = D/2 all
    find themselves."""
    info = RunDir(sketched_run).index_info()
    d, d2 = info.dim, info.sketch["out_dim"]
    _, feats = feature_matrix(sketched_run)
    u = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = u @ u.T - 2 * np.eye(len(u))
    assert cos.max(axis=1).min() > 0.999  # the fixture: every clip's nearest rival is almost itself
    rng = np.random.default_rng(0)
    n = 50
    t = rng.standard_normal((n, d))
    t /= np.linalg.norm(t, axis=1, keepdims=True)  # cos to a rival ~ 0 ± 1/√D: margin ~1, error ~√2/√D'
    st = Sketch(SketchSpec("srht", d, d2, 0)).apply(t, np.float64)
    margin_in_errors = 1.0 / (np.sqrt(2) / np.sqrt(d2))
    assert margin_in_errors > 4
    assert (np.argmax(st @ st.T, axis=1) == np.arange(n)).all()


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


def test_an_approximate_sketched_index_reranks_from_sketched_vectors(
    sketched_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(sketched_run, run)
    dim = RunDir(run).index_info().dim
    info = build_run_index(
        IndexConfig(run=run, precondition="cosine", index_factory="IVF2,Flat", index_dim=dim // 4)
    )
    assert info.sketch["out_dim"] == dim // 4 and info.rerank_vectors == "float16"
    q = _score(run, demo_data, "demo-00005", top_k=8)
    ids, feats = feature_matrix(run)
    pre = load_preconditioner(RunDir(run).preconditioner_dir)
    sk = Sketch(SketchSpec("srht", dim, dim // 4, 0))
    me = next(r for r in q["results"] if r["vid"] == "demo-00005")["clip_id"]
    brute = (
        sk.apply(pre.prepare_train(feats)) @ sk.apply(pre.prepare_query(feats[list(ids).index(me)][None]))[0]
    )
    by_id = dict(zip(ids.tolist(), brute.tolist()))
    for r in q["results"]:  # re-ranked from the float16 sketched vectors
        assert r["score"] == pytest.approx(by_id[r["clip_id"]], abs=2e-3)


def test_sketch_kind_and_seed_are_options_recorded_and_kept(
    sketched_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    """`--sketch countsketch --sketch-seed 3`: the index records them, a rebuild keeps them, the rebuild
    line names them, and score re-creates that sketch (its queries' vectors are the recorded sketch's)."""
    run = tmp_path / "run"
    shutil.copytree(sketched_run, run)
    d2 = RunDir(run).index_info().sketch["out_dim"]
    args = ["index", str(run), "--index-dim", str(d2), "--sketch", "countsketch", "--sketch-seed", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    info = RunDir(run).index_info()
    assert (info.sketch["kind"], info.sketch["seed"], info.sketch["out_dim"]) == ("countsketch", 3, d2)
    assert "--sketch countsketch --sketch-seed 3" in info.rebuild_command(run)
    cfg, kept = index_config_keeping(run, {})
    assert (cfg.sketch, cfg.sketch_seed) == ("countsketch", 3)
    assert kept["--sketch"] == "countsketch" and kept["--sketch-seed"] == 3
    vid = "demo-00000"
    doc = run_score(ScoreConfig(run=run, queries=[demo_data / "videos" / f"{vid}.mp4"],
                                prompt=_caption(demo_data, vid), device="cpu"))  # fmt: skip
    assert doc["queries"][0]["status"] == "ok"
    assert (doc["index"]["sketch"]["kind"], doc["index"]["sketch"]["seed"]) == ("countsketch", 3)
    r = CliRunner().invoke(app, ["index", str(run), "--index-dim", str(d2), "--sketch", "nope"])
    assert r.exit_code == 2 and "--sketch" in r.output
    r = CliRunner().invoke(app, ["index", str(run), "--sketch", "countsketch"])  # kept --index-dim: fine
    assert r.exit_code == 0, r.output
    with pytest.raises(UsageError, match="give --index-dim DIM too"):
        IndexConfig(run=run, sketch="countsketch").validate()
    cfg, _ = index_config_keeping(run, {"index_dim": 0})  # dropping the sketch drops its kind and seed
    assert (cfg.index_dim, cfg.sketch, cfg.sketch_seed) == (0, "srht", 0)
