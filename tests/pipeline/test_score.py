from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, read_prompts, run_score
from carv_attrib.store.digests import doc_digest
from carv_attrib.store.features import feature_matrix


def schema() -> dict:
    return json.loads(resources.files("carv_attrib").joinpath("schemas/attribution.schema.json").read_text())


def captions(demo_data: Path) -> dict[str, str]:
    return {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}


def test_training_clip_ranks_itself_first_with_cosine(featurized_run: Path, demo_data: Path) -> None:
    caps = captions(demo_data)
    for vid in ("demo-00002", "demo-00005"):
        doc = run_score(
            ScoreConfig(
                run=featurized_run,
                queries=[demo_data / "videos" / f"{vid}.mp4"],
                prompt=caps[vid],
                top_k=3,
                device="cpu",
            )
        )
        jsonschema.validate(doc, schema())
        top = doc["queries"][0]["results"][0]
        assert top["vid"] == vid and top["rank"] == 1 and top["caption"] == caps[vid]
        assert top["score"] == pytest.approx(1.0, abs=1e-4)


def test_top_k_all_equals_brute_force_inner_products(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    build_run_index(IndexConfig(run=run, precondition="identity"))
    vid = "demo-00004"
    doc = run_score(
        ScoreConfig(
            run=run,
            queries=[demo_data / "videos" / f"{vid}.mp4"],
            prompt=captions(demo_data)[vid],
            top_k=None,
            device="cpu",
        )
    )
    jsonschema.validate(doc, schema())
    results = doc["queries"][0]["results"]
    assert len(results) == 8
    ids, feats = feature_matrix(run)
    by_vid = {r["vid"]: r for r in results}
    # Same encode, same draws: the query's feature equals the clip's stored one.
    import pyarrow.parquet as pq

    vids = dict(
        zip(
            pq.read_table(run / "manifest" / "clips.parquet").column("clip_id").to_pylist(),
            pq.read_table(run / "manifest" / "clips.parquet").column("vid").to_pylist(),
        )
    )
    q = feats[[vids[i] for i in ids.tolist()].index(vid)]
    brute = feats.astype(np.float64) @ q.astype(np.float64)
    for i, s in zip(ids.tolist(), brute):
        assert by_vid[vids[i]]["score"] == pytest.approx(s, rel=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_undecodable_query_is_recorded_and_others_scored(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 2048)
    good = demo_data / "videos" / "demo-00001.mp4"
    (tmp_path / "p.json").write_text(
        json.dumps({"broken.mp4": "x", str(good): captions(demo_data)["demo-00001"]})
    )
    doc = run_score(
        ScoreConfig(
            run=featurized_run,
            queries=[bad, good],
            prompts_file=tmp_path / "p.json",
            top_k=2,
            device="cpu",
            aggregate="vote",
        )
    )
    jsonschema.validate(doc, schema())
    q_bad, q_good = doc["queries"]
    assert q_bad["status"] == "error" and q_bad["error"].startswith("decode_error") and q_bad["results"] == []
    assert q_good["status"] == "ok" and q_good["results"][0]["vid"] == "demo-00001"
    assert doc["aggregate"]["method"] == "vote" and doc["aggregate"]["queries"] == 1


def test_mean_aggregation_over_queries(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    caps = captions(demo_data)
    qs = [demo_data / "videos" / f"demo-0000{i}.mp4" for i in (1, 2)]
    (tmp_path / "p.csv").write_text("path,prompt\n" + "".join(f"{q.name},{caps[q.stem]}\n" for q in qs))
    doc = run_score(
        ScoreConfig(
            run=featurized_run,
            queries=qs,
            prompts_file=tmp_path / "p.csv",
            top_k=8,
            device="cpu",
            aggregate="mean",
        )
    )
    jsonschema.validate(doc, schema())
    agg = {r["vid"]: r["score"] for r in doc["aggregate"]["results"]}
    per = [{r["vid"]: r["score"] for r in q["results"]} for q in doc["queries"]]
    assert len(agg) == 8 and all(len(p) == 8 for p in per)
    for vid, s in agg.items():
        assert s == pytest.approx((per[0][vid] + per[1][vid]) / 2, rel=1e-5)


def test_run_built_with_another_model_is_refused(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    from carv_attrib.models.tiny import make_model

    make_model(str(tmp_path / "other"), "tiny", seed=3)
    with pytest.raises(ConfigMismatchError, match=r"is not the model that encoded this run.*vae"):
        run_score(
            ScoreConfig(
                run=featurized_run,
                queries=[demo_data / "videos" / "demo-00001.mp4"],
                prompt="x",
                model=str(tmp_path / "other"),
                device="cpu",
            )
        )


def test_prompt_rules(tmp_path: Path) -> None:
    assert read_prompts(["a.mp4"], "hello", None) == ["hello"]
    with pytest.raises(UsageError, match="--prompts"):
        read_prompts(["a.mp4", "b.mp4"], "hello", None)
    with pytest.raises(UsageError, match="needs its prompt"):
        read_prompts(["a.mp4"], None, None)
    (tmp_path / "p.json").write_text(json.dumps({"a.mp4": "x"}))
    with pytest.raises(UsageError, match="no prompt for: b.mp4"):
        read_prompts(["a.mp4", "b.mp4"], None, tmp_path / "p.json")


def encode_5_frames(manifest: Path, demo_data: Path, model: Path, out: Path, **options) -> None:
    """Encode demo clips at 5 frames, 32x32, in-process (a different config from `encoded_run`)."""
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode

    run_encode(
        EncodeConfig(
            manifest=manifest, videos=demo_data / "videos", model=str(model), run=out, frames=5, size="32x32", fps=8,
            workers=0, device="cpu", **options,
        )
    )  # fmt: skip


def test_stale_index_after_reencode_is_refused(
    featurized_run: Path, demo_data: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    encode_5_frames(demo_data / "manifest.json", demo_data, tiny_model_dir, run, shard_size=3, overwrite=True)
    with pytest.raises(ConfigMismatchError, match="re-encoded since"):
        build_run_index(IndexConfig(run=run))
    query = ScoreConfig(run=run, queries=[demo_data / "videos" / "demo-00001.mp4"], prompt="x", device="cpu")
    with pytest.raises(ConfigMismatchError, match="index is stale: it was built from latents"):
        run_score(query)


def test_float16_cache_query_reproduces_the_stored_feature(
    demo_data: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Queries are rounded through the cache's storage dtype, like the training clips.

    The query is VAE-encoded in a batch of 1, the training clips in batches of 3, so their float32
    latents differ by float32 rounding (~1e-7 relative). Rounded to float16 (ulp 2^-11 relative) those
    differences vanish except where a value straddles a float16 rounding boundary, where it moves by
    exactly one float16 ulp. Without the rounding nearly every element would differ. So: the rounded
    query latent equals the stored one except at a few elements, each exactly one float16 ulp apart;
    and the score is the query's own feature against the stored one, to the float32 accumulation
    error of a D-term dot product (γ_D = D·eps32, Higham's bound).
    """
    from carv_attrib.attrib.featurizer import load_featurizer
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.models.wan import encode_video, load_wan
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    from carv_attrib.store.latents import as_stored, iter_cached
    from carv_attrib.store.run import RunDir
    from carv_attrib.video.decode import decode_clip, frames_to_tensor

    rows = json.loads((demo_data / "manifest.json").read_text())[:3]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    run = tmp_path / "run"
    encode_5_frames(tmp_path / "m.json", demo_data, tiny_model_dir, run, latent_dtype="float16", batch_size=3)
    run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=2, device="cpu"))
    build_run_index(IndexConfig(run=run, precondition="identity"))
    vid = rows[1]["vid"]
    video = demo_data / "videos" / f"{vid}.mp4"
    doc = run_score(
        ScoreConfig(run=run, queries=[video], prompt=rows[1]["caption"], top_k=None, device="cpu")
    )
    hit = next(r for r in doc["queries"][0]["results"] if r["vid"] == vid)

    # The query's latent as `score` computes it: decoded with the run's policy, a batch of 1, rounded.
    info = RunDir(run).index_info()
    stored = next(c for c in iter_cached(run) if c.vid == vid)
    wan = load_wan(str(tiny_model_dir), ("vae",), device="cpu")
    frames = decode_clip(str(video), stored_policy(info)).frames
    z_q = as_stored(encode_video(wan.vae, frames_to_tensor(frames)[None])[0], "float16")

    def ulp(x: np.ndarray) -> np.ndarray:  # float16 spacing at |x|, as float32
        return np.spacing(np.abs(x).astype(np.float16)).astype(np.float32)

    diff = np.abs(z_q.numpy() - stored.latent.numpy())
    one_ulp = (diff == ulp(stored.latent.numpy())) | (
        diff == ulp(z_q.numpy())
    )  # either side of a binade edge
    assert np.all((diff == 0) | one_ulp), "only single float16 ulps may differ"
    assert (diff > 0).mean() < 0.01, (
        f"{(diff > 0).mean():.3%} of the latent differs: the query was not rounded"
    )

    featurizer = load_featurizer(
        str(tiny_model_dir), [None], DrawRule.from_dict(info.draws), info.output_fn, "cpu", "float32",
        projector_specs=[info.projector],
    )  # fmt: skip
    phi_q = featurizer.features([(0, z_q, stored.text_emb)])[0][0].double().numpy()  # (D,)
    ids, feats = feature_matrix(run)
    own = dict(zip(ids.tolist(), feats.astype(np.float64)))[hit["clip_id"]]
    gamma = info.dim * np.finfo(np.float32).eps
    assert abs(hit["score"] - phi_q @ own) <= gamma * np.abs(phi_q * own).sum()


def stored_policy(info):
    from carv_attrib.video.decode import FramePolicy

    e = info.encode
    return FramePolicy(frames=e.frames, height=e.height, width=e.width, fps=e.fps, pad_short=e.pad_short)


def test_model_paths_are_recorded_absolute_and_a_missing_one_is_named(
    featurized_run: Path,
    demo_data: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carv_attrib.errors import ModelLoadError
    from carv_attrib.models.identity import model_identity

    monkeypatch.chdir(tiny_model_dir.parent)
    assert model_identity(tiny_model_dir.name, ("vae",))["source"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such model directory"):
        run_score(
            ScoreConfig(
                run=featurized_run,
                queries=[demo_data / "videos" / "demo-00001.mp4"],
                prompt="x",
                model=tiny_model_dir.name,
                device="cpu",
            )
        )


def test_an_index_of_an_unknown_objective_is_refused_before_any_query(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    """No fallback: an objective kind this version does not know is not scored as uniform."""
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    info_path = run / "index" / "index_info.json"
    info = json.loads(info_path.read_text())
    info["objective"] = {"kind": "saliency"}
    info["digest"] = doc_digest(info)  # as a later version would write it, not a hand edit
    info_path.write_text(json.dumps(info))
    with pytest.raises(UsageError, match=r"unknown objective 'saliency'; expected one of uniform, motion"):
        run_score(
            ScoreConfig(run=run, queries=[demo_data / "videos" / "demo-00001.mp4"], prompt="x", device="cpu")
        )


def test_each_result_is_placed_among_the_querys_scores_over_the_run(
    featurized_run: Path, demo_data: Path
) -> None:
    """top-3 of a run of 8: the scale reads every clip's indexed vector (exact), and a result's
    percentile and z are those of its score among all 8, as a top_k=None search gives them."""
    vid = "demo-00004"
    query = dict(
        run=featurized_run, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=captions(demo_data)[vid]
    )
    top = run_score(ScoreConfig(**query, top_k=3, device="cpu"))
    jsonschema.validate(top, schema())
    q = top["queries"][0]
    assert q["scale"]["method"] == "exact" and q["scale"]["clips"] == q["scale"]["scores"] == 8
    every = np.array(
        [
            r["score"]
            for r in run_score(ScoreConfig(**query, top_k=None, device="cpu"))["queries"][0]["results"]
        ]
    )
    # FAISS sums D float32 products per score (rounding ≤ ~√D·eps32·max|s|); the scale recomputes them
    # in float64, so z = (s − mean)/sd agrees to that error over sd, a few times over
    score_err = np.sqrt(top["index"]["dim"]) * np.finfo(np.float32).eps * np.abs(every).max()
    for r in q["results"]:
        assert r["percentile"] == pytest.approx(100.0 * (9 - r["rank"]) / 8)  # distinct scores: rank decides
        expected_z = (r["score"] - every.mean()) / every.std()
        assert r["z"] == pytest.approx(expected_z, abs=8 * score_err / every.std())


def test_a_directory_query_is_a_named_failure_and_a_large_top_k_is_said(
    featurized_run: Path, demo_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    video = demo_data / "videos" / "demo-00001.mp4"
    (tmp_path / "p.json").write_text(json.dumps({str(folder): "x", str(video): "y"}))
    doc = run_score(
        ScoreConfig(
            run=featurized_run,
            queries=[folder, video],
            prompts_file=tmp_path / "p.json",
            top_k=20,
            device="cpu",
        )
    )
    jsonschema.validate(doc, schema())
    bad, good = doc["queries"]
    assert bad["status"] == "error" and "not a video file but a directory" in bad["error"]
    assert good["status"] == "ok" and len(good["results"]) == 8
    assert any("top-k 20" in w and "(8)" in w for w in doc["warnings"])
