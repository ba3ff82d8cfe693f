"""featurize / score --lora: attribution through a LoRA adapter's A and B parameters.

The adapter is a rank-2 LoRA on the tiny model's attention projections with a random B (a fresh
adapter has B = 0, which zeroes every A gradient). Its gradient is small (Σ r·(in + out) numbers), so
featurize keeps it exact: the feature dim is the adapter's parameter count, and a stored feature equals
`torch.autograd.grad` of the clip's objective w.r.t. A and B under the same draws. score takes the
adapter from the index, refuses another one (exit 2, one line), and a run without --lora is unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carv_attrib.cli.app import app
from carv_attrib.errors import ConfigMismatchError, UsageError
from carv_attrib.models.lora import add_lora, lora_layers, save_lora
from carv_attrib.models.wan import load_transformer, pad_context
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.index import IndexConfig, build_run_index
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.pipeline.status import status_doc
from carv_attrib.store.features import feature_matrix
from carv_attrib.store.latents import iter_cached
from carv_attrib.store.run import RunDir

RANK = 2
K = 4
EPS32 = torch.finfo(torch.float32).eps


def make_adapter(model: Path, out: Path, seed: int) -> Path:
    """A rank-2 adapter with random B, saved in the diffusers format."""
    tr = load_transformer(str(model))
    add_lora(tr, rank=RANK, seed=seed)
    with torch.no_grad():
        for i, (name, prm) in enumerate(tr.named_parameters()):
            if "lora_B" in name:
                gen = torch.Generator().manual_seed(1000 * seed + i)
                prm.copy_(0.1 * torch.randn(prm.shape, generator=gen))
    return save_lora(tr, out, meta={"base": str(model)})


@pytest.fixture(scope="module")
def lora_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, encoded_run: Path
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(tiny_model_dir, root / "adapter", seed=1)
    run = root / "run"
    shutil.copytree(encoded_run, run)
    run_featurize(
        FeaturizeConfig(
            run=run, model=str(tiny_model_dir), draws=K, device="cpu", batch_clips=4, lora=adapter
        )
    )
    build_run_index(IndexConfig(run=run, precondition="cosine"))
    return run, adapter


def _lora_param_count(model: Path) -> int:
    tr = load_transformer(str(model))
    add_lora(tr, rank=RANK)
    return sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n)


def test_features_are_the_exact_lora_gradient(lora_run: tuple[Path, Path], tiny_model_dir: Path) -> None:
    run, adapter = lora_run
    ids, feats = feature_matrix(run)
    n_params = _lora_param_count(tiny_model_dir)
    assert feats.shape == (8, n_params)  # exact: one number per A/B parameter

    # the recorded adapter: fingerprinted identity in the features' config, its path in the index
    config = json.loads((run / "features" / "config.json").read_text())["config"]
    assert config["lora"]["rank"] == RANK and len(config["lora"]["weights_sha256"]) == 64
    assert "path" not in config["lora"]  # provenance, not identity
    assert config["projector"]["lora"] is True and config["projector"]["dim"] == n_params
    info = RunDir(run).index_info()
    assert info.lora is not None and info.lora["path"] == str(adapter.resolve())
    assert info.lora["weights_sha256"] == config["lora"]["weights_sha256"]
    assert info.lora["base"] == str(tiny_model_dir)  # carv_lora.json's provenance
    assert status_doc(run).index.summary.lora == info.lora  # `status` shows it

    # one stored feature against plain autograd of the A/B weights under the featurizer's draws
    from carv_attrib.attrib.featurizer import load_featurizer
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.carv.objective import clip_objective

    fz = load_featurizer(
        str(tiny_model_dir), [None], DrawRule.from_dict(info.draws), "loss", "cpu", "float32",
        projector_specs=[info.projector], lora=str(adapter),
    )  # fmt: skip
    tr = fz.transformers[0]
    clip = next(iter_cached(run))
    sigma, w, eps = fz.draws(clip.clip_id, tuple(clip.latent.shape))
    layers = lora_layers(tr)
    params = [m.weight for _, m in layers]
    for p in tr.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    obj, _ = clip_objective(tr, clip.latent, pad_context(clip.text_emb), sigma, eps, w)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, params)]).double()
    got = torch.from_numpy(feats[ids.tolist().index(clip.clip_id)]).double()
    # per layer block, float32 tolerance C·eps·sqrt(n), n = the longest differing contraction: the hooks'
    # sum over the 512 padded text tokens of the cross-attention K/V (longer than any layer's out·in)
    tol = 8 * EPS32 * math.sqrt(max(512, max(m.weight.numel() for _, m in layers)))
    start = 0
    for name, m in layers:
        sl = slice(start, start + m.weight.numel())
        assert float(ref[sl].norm()) > 0, name
        err = float((got[sl] - ref[sl]).norm() / ref[sl].norm())
        assert err <= tol, (name, err, tol)
        start = sl.stop
    assert start == got.shape[0]


def test_score_takes_the_adapter_from_the_index(lora_run: tuple[Path, Path], demo_data: Path) -> None:
    run, adapter = lora_run
    caps = {r["vid"]: r["caption"] for r in json.loads((demo_data / "manifest.json").read_text())}
    vid = "demo-00003"
    doc = run_score(
        ScoreConfig(run=run, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=caps[vid], top_k=3,
                    device="cpu", workers=0)
    )  # fmt: skip
    top = doc["queries"][0]["results"][0]
    assert top["vid"] == vid and top["score"] == pytest.approx(1.0, abs=1e-4)  # itself, cosine 1
    assert doc["index"]["lora"]["weights_sha256"] == RunDir(run).index_info().lora["weights_sha256"]
    # --explain splits a score over the adapter's layers (the spec's per-layer blocks)
    explained = run_score(
        ScoreConfig(run=run, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=caps[vid], top_k=2,
                    device="cpu", workers=0, explain=True)
    )  # fmt: skip
    ex = explained["queries"][0]["results"][0]["explain"]
    assert all(".lora_" in layer["layer"] for layer in ex["top_layers"]), ex["top_layers"]
    # the same adapter named explicitly scores the same
    again = run_score(
        ScoreConfig(run=run, queries=[demo_data / "videos" / f"{vid}.mp4"], prompt=caps[vid], top_k=3,
                    device="cpu", workers=0, lora=adapter)
    )  # fmt: skip
    assert [r["clip_id"] for r in again["queries"][0]["results"]] == [
        r["clip_id"] for r in doc["queries"][0]["results"]
    ]


def test_score_refuses_another_adapter(
    lora_run: tuple[Path, Path], featurized_run: Path, tiny_model_dir: Path, demo_data: Path, tmp_path: Path
) -> None:
    run, _ = lora_run
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=2)
    query = demo_data / "videos" / "demo-00001.mp4"
    with pytest.raises(ConfigMismatchError, match="not the adapter"):
        run_score(ScoreConfig(run=run, queries=[query], prompt="a", device="cpu", workers=0, lora=other))
    runner = CliRunner()
    for args in (
        ["--run", str(run), "--lora", str(other)],  # another adapter
        ["--run", str(featurized_run), "--lora", str(other)],  # an index featurized without one
    ):
        r = runner.invoke(app, ["score", str(query), "-p", "a", "--device", "cpu", "--workers", "0", *args])
        assert r.exit_code == 2, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "adapter" in lines[0] and "Traceback" not in r.output, r.output


def test_featurize_refuses_lora_with_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--lora or --layers"):
        FeaturizeConfig(
            run=tmp_path, model=str(tiny_model_dir), lora=tmp_path, layers=["blocks.0.*"]
        ).validate()


def test_a_run_without_lora_records_none(featurized_run: Path) -> None:
    """No regression: without --lora the features' config, projector spec and index have no adapter."""
    config = json.loads((featurized_run / "features" / "config.json").read_text())["config"]
    assert "lora" not in config and "lora" not in config["projector"]
    assert not any("exact_in" in e or "exact_out" in e for e in config["projector"]["layers"])
    assert RunDir(featurized_run).index_info().lora is None


def test_featurize_lora_through_the_cli(
    lora_run: tuple[Path, Path], encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`featurize RUN -m MODEL --lora DIR`: the option the typed config defines, the same features as
    the library call (same adapter, same draws), and `status` names the adapter."""
    ref_run, adapter = lora_run
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    runner = CliRunner()
    r = runner.invoke(
        app, ["featurize", str(run), "-m", str(tiny_model_dir), "--lora", str(adapter), "-K", str(K),
              "--device", "cpu", "--precondition", "cosine", "--format", "json"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dim"] == _lora_param_count(tiny_model_dir)
    ids, feats = feature_matrix(run)
    ref_ids, ref = feature_matrix(ref_run)
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(torch.from_numpy(feats), torch.from_numpy(ref), rtol=1e-5, atol=1e-7)
    r = runner.invoke(app, ["status", str(run), "--format", "human"])
    assert r.exit_code == 0, r.output
    assert f"LoRA rank {RANK}" in " ".join(r.stdout.split()), r.output


def test_lora_features_on_a_featurized_run_say_how_to_keep_both(
    featurized_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A run featurized through the model's layers refuses --lora features (another configuration),
    in a line of bounded length that says how to keep both indexes: copy the run, its latents reused."""
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    with pytest.raises(ConfigMismatchError) as exc:
        run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), device="cpu", lora=adapter))
    msg = str(exc.value)
    assert f"cp -r {run} {run}-lora" in msg and "--overwrite" in msg
    assert len(msg) < 2000, len(msg)  # the per-layer projector lists are abridged, not dumped
