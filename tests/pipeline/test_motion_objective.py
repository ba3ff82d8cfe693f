"""Motion attribution end to end: `encode --motion-masks` stores a motion map per clip on its latent
grid; `featurize --objective motion` weights the per-token loss by it; `score` treats queries alike.

A clip where nothing moves gets weights 1 everywhere, so its motion feature is bitwise its uniform
feature; moving clips' features change. A training clip scored as a query finds itself first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.lds.synthetic import clip_specs, make_demo_data, render_frames, write_mp4
from carv_attrib.pipeline.encode import EncodeConfig, run_encode
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.store.digests import doc_digest
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import RunDir

EPS32 = float(np.finfo(np.float32).eps)


def _encode(data: Path, model: Path, run: Path, motion: bool = True) -> None:
    run_encode(
        EncodeConfig(manifest=data / "manifest.json", videos=data / "videos", model=str(model), run=run,
                     frames=9, size="32x32", fps=8, shard_size=4, workers=1, device="cpu", motion_masks=motion)
    )  # fmt: skip


@pytest.fixture(scope="module")
def motion_world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(data dir: 6 demo clips + one static clip "still", encoded run with motion maps)."""
    root = tmp_path_factory.mktemp("motion")
    data = root / "data"
    make_demo_data(data, clips=6, seed=3)
    spec = clip_specs(1, seed=9)[0]
    still = np.repeat(render_frames(spec, 1, 96, 80, 0.0), 24, axis=0)  # (24, 80, 96, 3): nothing moves
    write_mp4(data / "videos" / "still.mp4", still, 8.0)
    rows = json.loads((data / "manifest.json").read_text()) + [{"vid": "still", "caption": spec.caption}]
    (data / "manifest.json").write_text(json.dumps(rows))
    run = root / "run"
    _encode(data, tiny_model_dir, run)
    return data, run


def _featurized_copy(run: Path, model: Path, dest: Path, **featurize: object) -> Path:
    """A copy of `run` at `dest`, featurized with the given FeaturizeConfig options."""
    shutil.copytree(run, dest)
    run_featurize(FeaturizeConfig(run=dest, model=str(model), device="cpu", **featurize))
    return dest


def test_encode_stores_a_motion_map_on_each_latent_grid(motion_world: tuple[Path, Path]) -> None:
    _, run = motion_world
    clips = {c.vid: c for c in iter_cached(run)}
    assert len(clips) == 7
    for c in clips.values():
        assert c.motion is not None and tuple(c.motion.shape) == tuple(c.latent.shape[1:])  # (T, h, w)
        assert (c.motion >= 0).all()
    assert float(clips["still"].motion.max()) < 1e-3
    assert all(float(c.motion.max()) > 0.5 for v, c in clips.items() if v != "still")  # px per frame
    assert (
        json.loads((run / "latents" / "config.json").read_text())["config"]["motion_masks"] == "farneback-v1"
    )


def test_a_run_encoded_without_maps_refuses_the_motion_objective(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    with pytest.raises(UsageError, match="--motion-masks"):
        run_featurize(
            FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=2, objective="motion", device="cpu")
        )
    assert not (run / "features").exists()


def test_adding_motion_maps_to_a_run_is_a_new_encode_configuration(
    motion_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    data, run = motion_world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(ConfigMismatchError, match="motion_masks"):
        _encode(data, tiny_model_dir, copy, motion=False)


def test_the_motion_objective_reweights_moving_clips_only(
    motion_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, run = motion_world
    feats = {}
    for objective in ("uniform", "motion"):
        r = _featurized_copy(
            run, tiny_model_dir, tmp_path / objective, draws=3, objective=objective, batch_clips=1
        )
        t = RunDir(r).features.read_table(columns=["vid", "feature"]).to_pylist()
        feats[objective] = {row["vid"]: np.asarray(row["feature"], dtype=np.float32) for row in t}
    assert set(feats["uniform"]) == set(feats["motion"]) and len(feats["motion"]) == 7
    # nothing moves: weights are exactly 1, the same computation
    np.testing.assert_array_equal(feats["motion"]["still"], feats["uniform"]["still"])
    for vid in feats["uniform"]:
        if vid != "still":
            u, m = feats["uniform"][vid], feats["motion"][vid]
            assert np.linalg.norm(m - u) > 1e-2 * np.linalg.norm(u), vid


def test_a_training_clip_scored_under_motion_finds_itself(
    motion_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    data, run = motion_world
    r = _featurized_copy(run, tiny_model_dir, tmp_path / "run", draws=3, objective="motion")
    info = build_run_index(IndexConfig(run=r, precondition="cosine"))
    assert info.objective["kind"] == "motion"
    rows = json.loads((data / "manifest.json").read_text())
    query = data / "videos" / f"{rows[1]['vid']}.mp4"
    doc = run_score(ScoreConfig(run=r, queries=[query], prompt=rows[1]["caption"], top_k=3, workers=0,
                                device="cpu"))  # fmt: skip
    assert doc["index"]["estimator"]["objective"]["kind"] == "motion"
    top = doc["queries"][0]["results"][0]
    assert top["vid"] == rows[1]["vid"]
    # the same frames, latent and map (both rounded through float16 storage): cosine 1 up to the
    # float32 feature arithmetic (batch composition differs: B clips per backward vs one query)
    assert top["score"] == pytest.approx(1.0, abs=info.dim * EPS32)
    with pytest.raises(UsageError, match="built with --objective motion"):
        run_score(
            ScoreConfig(run=r, queries=[query], prompt="x", objective="uniform", workers=0, device="cpu")
        )


def test_queries_get_bitwise_the_maps_training_clips_got(motion_world: tuple[Path, Path]) -> None:
    """`score` decodes a query with `decode_with_motion` under the index's frame policy and rounds its
    map through float16 like encode stores it: for a training clip that is its stored map, bit for
    bit (the self-match test above is too coarse to see a small map difference)."""
    from carv_attrib.store.run import EncodeFacts
    from carv_attrib.video.motion import decode_with_motion, latent_motion

    data, run = motion_world
    policy = EncodeFacts.from_latents_config(RunDir(run).latents.read_config()["config"]).policy
    for c in iter_cached(run):
        decoded = decode_with_motion(str(data / "videos" / f"{c.vid}.mp4"), policy)
        q = latent_motion(decoded.motion, c.latent.shape[1]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(q, c.motion.numpy(), err_msg=c.vid)


def test_plan_fits_the_objective_and_featurize_refuses_another(
    motion_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from carv_attrib.pipeline.plan import PlanConfig, run_plan

    _, run = motion_world
    r = tmp_path / "run"
    shutil.copytree(run, r)
    plan = run_plan(PlanConfig(run=r, model=str(tiny_model_dir), out=tmp_path / "plan.json", pilot_clips=2, bins=4,
                               draws=2, replicates=2, objective="motion", device="cpu"))  # fmt: skip
    assert plan["objective"] == "motion"
    with pytest.raises(UsageError, match="fitted for --objective motion"):
        run_featurize(FeaturizeConfig(run=r, model=str(tiny_model_dir), draws=2, plan=tmp_path / "plan.json",
                                      device="cpu"))  # fmt: skip
    assert not (r / "features").exists()
    run_featurize(FeaturizeConfig(run=r, model=str(tiny_model_dir), draws=2, plan=tmp_path / "plan.json",
                                  objective="motion", device="cpu"))  # fmt: skip


def test_an_index_of_another_flow_rule_is_refused_before_any_query(
    motion_world: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    data, run = motion_world
    r = _featurized_copy(run, tiny_model_dir, tmp_path / "run", draws=2, objective="motion")
    build_run_index(IndexConfig(run=r))
    info_path = r / "index" / "index_info.json"
    info = json.loads(info_path.read_text())
    info["objective"]["rule"] = "farneback-v0"
    info["digest"] = doc_digest(info)  # as that version would have written it, not a hand edit
    info_path.write_text(json.dumps(info))
    query = next((data / "videos").glob("*.mp4"))
    with pytest.raises(UsageError, match="farneback-v0"):
        run_score(ScoreConfig(run=r, queries=[query], prompt="x", workers=0, device="cpu"))
