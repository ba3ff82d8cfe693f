from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import RunDir
from carv_attrib.store.shards import ShardStore
from tests.pipeline.sigkill import sigkill_after_first_shard


def copy_latents(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(src / "latents", dst / "latents")
    shutil.copytree(src / "manifest", dst / "manifest")
    return dst


def test_features_rows_diagnostics_and_provenance(featurized_run: Path) -> None:
    store = ShardStore(featurized_run, "features")
    t = store.read_table()
    assert t.num_rows == 8 and set(t.column("status").to_pylist()) == {"ok"}
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["feature"]) == 5120  # 20 block Linear layers x 16 x 16
    assert len(row["sigmas"]) == len(row["weights"]) == len(row["draw_losses"]) == 4
    assert row["feature_norm"] == pytest.approx(float(np.linalg.norm(row["feature"])), rel=1e-5)
    assert row["loss"] == pytest.approx(
        float(np.mean(np.array(row["draw_losses"]) * np.array(row["weights"]))), rel=1e-5
    )
    # Shared noise: every clip saw the same stratified σ, one per stratum.
    sig = np.array(t.column("sigmas").to_pylist())
    assert np.all(sig == sig[0]) and all(k / 4 <= s < (k + 1) / 4 for k, s in enumerate(sig[0]))
    cfg = store.read_config()["config"]
    assert (
        cfg["draws"]["scheme"] == "stratified-is" and cfg["draws"]["draws"] == 4 and cfg["draws"]["seed"] == 0
    )
    assert cfg["projector"]["kind"] == "kron" and cfg["timestep"] == "t = 1000*sigma (float)"
    info = RunDir(featurized_run).index_info()
    assert info.count == 8 and info.dim == 5120 and info.preconditioner["kind"] == "cosine"
    assert info.encode.frames == 9 and info.draws == cfg["draws"]


def test_features_equal_the_estimator_computed_by_hand(featurized_run: Path, tiny_model_dir: Path) -> None:
    """φ = P ĝ with ĝ the weighted K-draw mean gradient, recomputed clip by clip with plain autograd."""
    from carv_attrib.attrib.gradients import flat_grad
    from carv_attrib.attrib.projection import KronProjector, kron_matrix, select_linear_layers
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.carv.objective import clip_objective
    from carv_attrib.models.wan import load_transformer, pad_context

    info = RunDir(featurized_run).index_info()
    rule = DrawRule.from_dict(info.draws)
    transformer = load_transformer(str(tiny_model_dir))
    proj = KronProjector.from_spec(transformer, info.projector)
    layers = select_linear_layers(transformer)
    P = kron_matrix(proj)
    ids, feats = feature_matrix(featurized_run)
    stored = dict(zip(ids.tolist(), feats))
    clip = next(iter_cached(featurized_run))
    sigma, w, eps = rule.draws_for(rule.stream_for(clip.clip_id), tuple(clip.latent.shape))
    transformer.zero_grad()
    obj, _ = clip_objective(
        transformer, clip.latent, pad_context(clip.text_emb), sigma, eps, w, info.output_fn
    )
    obj.backward()
    expected = (flat_grad(layers) @ P).numpy()
    np.testing.assert_allclose(stored[clip.clip_id], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_rerun_resumes_and_other_config_is_refused(
    featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    cfg = FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=4, device="cpu", batch_clips=3)
    s = run_featurize(cfg)
    assert s.shards_written == 0 and s.computed == 0 and s.changes["unchanged"] == s.clips
    cfg.draws = 6
    with pytest.raises(ConfigMismatchError, match=r"draws.draws: 4 -> 6"):
        run_featurize(cfg)
    cfg.draws, cfg.timesteps = 4, "iid"
    with pytest.raises(ConfigMismatchError, match=r"scheme: 'stratified-is' -> 'iid'"):
        run_featurize(cfg)
    cfg.overwrite = True
    assert run_featurize(cfg).computed == s.clips


def test_model_that_did_not_encode_the_run_is_refused(encoded_run: Path, tmp_path: Path) -> None:
    from carv_attrib.models.tiny import make_model

    make_model(str(tmp_path / "other"), "tiny", seed=7)
    run = copy_latents(encoded_run, tmp_path / "run")
    with pytest.raises(UsageError, match=r"is not the model that encoded this run.*vae"):
        run_featurize(FeaturizeConfig(run=run, model=str(tmp_path / "other"), draws=2, device="cpu"))


def test_nonfinite_feature_is_flagged_and_kept_out_of_the_index(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_latents(encoded_run, tmp_path / "run")
    shard = ShardStore(run, "latents").shard_path(0)
    table = pq.read_table(shard)
    rows = table.to_pylist()
    z = np.frombuffer(rows[1]["latent"], np.float32).copy()
    z[0] = np.inf
    rows[1]["latent"] = z.tobytes()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    s = run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=2, device="cpu"))
    assert s.nonfinite == 1 and s.ok == 7
    bad = (
        ShardStore(run, "features")
        .read_table()
        .filter(pa.compute.equal(pa.compute.field("status"), "nonfinite"))
    )
    assert bad.column("vid").to_pylist() == [rows[1]["vid"]]
    info = build_run_index(IndexConfig(run=run, precondition="trak"))
    assert info.count == 7


def test_two_checkpoints_concatenate_blocks(encoded_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from carv_attrib.models.wan import load_transformer

    t = load_transformer(str(tiny_model_dir))
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(1.1)
    t.save_pretrained(str(tmp_path / "ck2"))
    run = copy_latents(encoded_run, tmp_path / "run")
    s = run_featurize(
        FeaturizeConfig(
            run=run,
            model=str(tiny_model_dir),
            checkpoints=[str(tiny_model_dir), str(tmp_path / "ck2")],
            draws=2,
            device="cpu",
            proj_dim=320,
        )
    )
    assert s.dim == 2 * 320
    info = build_run_index(IndexConfig(run=run, precondition="trak"))
    assert info.blocks == [320, 320] and len(info.preconditioner["lambdas"]) == 2
    ids, feats = feature_matrix(run)
    assert not np.allclose(feats[:, :320], feats[:, 320:]), "different checkpoints give different blocks"


FEATURIZE = textwrap.dedent(
    """
    import sys, time
    from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
    def slow(event, info):
        if event == "shard":
            time.sleep(float(sys.argv[3]))
    run_featurize(FeaturizeConfig(run=sys.argv[1], model=sys.argv[2], draws=4, device="cpu", batch_clips=3,
                                  shard_size=3), progress=slow)
    """
)


def test_sigkill_mid_featurize_then_rerun_gives_identical_features(
    encoded_run: Path, featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_latents(encoded_run, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", FEATURIZE, str(run), str(tiny_model_dir), "3"], env=env, stderr=subprocess.PIPE
    )
    store = ShardStore(run, "features")
    sigkill_after_first_shard(proc, store)
    assert 1 <= len(store.done_shards()) < 3
    assert (
        subprocess.run(
            [sys.executable, "-c", FEATURIZE, str(run), str(tiny_model_dir), "0"], env=env
        ).returncode
        == 0
    )
    ids_a, fa = feature_matrix(run)
    ids_b, fb = feature_matrix(featurized_run)  # uninterrupted, in-process, the same batches of 3
    assert sorted(ids_a.tolist()) == sorted(ids_b.tolist()) and len(set(ids_a.tolist())) == 8
    fa, fb = fa[np.argsort(ids_a)], fb[np.argsort(ids_b)]
    np.testing.assert_array_equal(fa, fb)
