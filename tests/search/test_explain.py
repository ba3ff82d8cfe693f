"""search/explain.py: a score's split over layers and blocks, and over timestep strata, adds up to the
score; `score --explain` attaches both to every result."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import Proposal
from carv_attrib.models.wan import load_transformer
from carv_attrib.pipeline.score import ScoreConfig, run_score
from carv_attrib.search.explain import (
    KINDS,
    by_block,
    by_kind,
    explain_result,
    layer_kind,
    layer_slices,
    layer_split,
    strata_edges,
    stratum_of,
    stratum_split,
)
from carv_attrib.search.precondition import (
    CosinePreconditioner,
    GramAccumulator,
    NormalizePreconditioner,
    Preconditioner,
)

EPS32 = float(np.finfo(np.float32).eps)

SPEC = {
    "kind": "kron",
    "layers": [
        {"name": "blocks.0.attn1.to_q", "k_out": 2, "k_in": 3},
        {"name": "blocks.0.ffn.net.2", "k_out": 1, "k_in": 4},
        {"name": "blocks.1.attn2.to_v", "k_out": 2, "k_in": 2},
        {"name": "proj_out", "k_out": 1, "k_in": 2},
    ],
}


def test_layer_terms_add_up_to_the_score_and_group_by_block() -> None:
    d = 6 + 4 + 4 + 2
    rng = np.random.default_rng(0)
    q, x = rng.standard_normal((2, 2 * d)).astype(np.float32)  # two checkpoints' blocks
    slices = layer_slices(SPEC, [d, d])
    assert [n for n, _ in slices][:2] == ["ckpt0/blocks.0.attn1.to_q", "ckpt0/blocks.0.ffn.net.2"]
    split = layer_split(q, x, slices)
    assert sum(split.values()) == pytest.approx(float(q.astype(np.float64) @ x), rel=0, abs=2 * d * 2.0**-52)
    blocks = by_block(split)
    assert set(blocks) == {"ckpt0/blocks.0", "ckpt0/blocks.1", "ckpt0/proj_out", "ckpt1/blocks.0",
                           "ckpt1/blocks.1", "ckpt1/proj_out"}  # fmt: skip
    e = explain_result(split, top=3)
    assert len(e["top_layers"]) == 3 and abs(e["top_layers"][0]["score"]) == max(
        abs(v) for v in split.values()
    )
    with pytest.raises(ValueError, match="dense projector"):
        layer_slices({"kind": "dense", "dim": 8}, [8])


def test_layer_kinds_follow_the_wan_block_parts_with_checkpoint_prefixes() -> None:
    # The Linear names of diffusers' WanTransformer3DModel (the tiny model's, listed from named_modules)
    kinds = {
        "blocks.3.attn1.to_q": "self_attention",
        "blocks.3.attn1.to_out.0": "self_attention",
        "blocks.3.attn2.to_k": "cross_attention",
        "blocks.12.attn2.add_k_proj": "cross_attention",  # image-to-video: the CLIP image tokens
        "blocks.3.ffn.net.0.proj": "feed_forward",
        "blocks.3.ffn.net.2": "feed_forward",
        "ckpt1/blocks.0.attn1.to_v": "self_attention",
        "ckpt12/blocks.1.attn2.to_out.0": "cross_attention",
        "ckpt0/blocks.1.ffn.net.2": "feed_forward",
        "proj_out": "other",
        "ckpt1/proj_out": "other",
        "condition_embedder.text_embedder.linear_1": "other",
        "condition_embedder.time_proj": "other",
        "blocks.attn1.to_q": "other",  # no block number: not a block's layer
        "xblocks.0.attn1.to_q": "other",
    }
    assert {n: layer_kind(n) for n in kinds} == kinds


def test_kind_terms_add_up_to_the_total() -> None:
    d = 6 + 4 + 4 + 2
    rng = np.random.default_rng(1)
    q, x = rng.standard_normal((2, 3 * d)).astype(np.float32)  # three checkpoints' blocks
    split = layer_split(q, x, layer_slices(SPEC, [d, d, d]))
    kinds = by_kind(split)
    assert tuple(kinds) == KINDS
    # regrouping n float64 terms moves their sum by at most n·eps64·Σ|term|
    tol = len(split) * float(np.finfo(np.float64).eps) * sum(abs(v) for v in split.values())
    assert sum(kinds.values()) == pytest.approx(sum(split.values()), rel=0, abs=tol)
    for kind, want in (("self_attention", "attn1"), ("cross_attention", "attn2"), ("feed_forward", "ffn")):
        assert kinds[kind] == pytest.approx(
            sum(v for n, v in split.items() if f".{want}." in n), rel=0, abs=tol
        )
    assert kinds["other"] == pytest.approx(
        sum(v for n, v in split.items() if n.endswith("proj_out")), abs=tol
    )
    assert explain_result(split)["by_kind"] == kinds
    assert by_kind({"blocks.0.ffn.net.2": 1.5}) == {"self_attention": 0.0, "cross_attention": 0.0,
                                                    "feed_forward": 1.5, "other": 0.0}  # fmt: skip


def test_score_explain_splits_every_result(featurized_run: Path, demo_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    query = sorted((demo_data / "videos").glob("*.mp4"))[1]
    doc = run_score(ScoreConfig(run=run, queries=[query], prompt="a clip", top_k=3, workers=0, device="cpu",
                                explain=True))  # fmt: skip
    dim = doc["index"]["dim"]
    for r in doc["queries"][0]["results"]:
        e = r["explain"]
        # float32 inner product of unit vectors vs float64 sums of the same products: |Δ| <= D·eps32
        assert e["total"] == pytest.approx(r["score"], rel=0, abs=dim * float(np.finfo(np.float32).eps))
        assert sum(e["by_block"].values()) == pytest.approx(e["total"], rel=0, abs=dim * 2.0**-52)
        # the tiny model's layers are attn1/attn2/ffn Linears only (the default patterns), so "other" is 0;
        # cosine index: Σ|terms| <= ‖ψ_q‖‖ψ_i‖ = 1, so regrouping them moves the sum by <= D·eps64
        assert set(e["by_kind"]) == set(KINDS) and e["by_kind"]["other"] == 0.0
        assert sum(e["by_kind"].values()) == pytest.approx(e["total"], rel=0, abs=dim * 2.0**-52)
        assert all(k.startswith("blocks.") or "." not in k for k in e["by_block"])


def test_strata_are_the_draws_of_the_stratified_schemes_and_equal_mass_bands_under_iid() -> None:
    rule = DrawRule(seed=3, scheme="stratified", k=4, density="uniform")
    np.testing.assert_array_equal(strata_edges(rule), [0.0, 0.25, 0.5, 0.75, 1.0])
    sigma, _, _ = rule.draws_for(0, (1,))
    assert stratum_of(rule, sigma.numpy()).tolist() == [0, 1, 2, 3]
    assert all(
        lo <= s < hi for s, lo, hi in zip(sigma.tolist(), strata_edges(rule)[:-1], strata_edges(rule)[1:])
    )
    # stratified-is: the strata are the proposal's; every draw k lies in its own stratum's σ interval
    q = Proposal.from_bins(torch.linspace(0, 1, 5), torch.tensor([4.0, 1.0, 1.0, 1.0]), "uniform", mix=0.1)
    rule_is = DrawRule(seed=3, scheme="stratified-is", k=8, density="uniform", proposal=q)
    edges = strata_edges(rule_is)
    sig, _, _ = rule_is.draws_for(0, (1,))
    assert np.all((edges[:-1] <= sig.numpy()) & (sig.numpy() <= edges[1:]))
    assert edges[1] < 0.125  # the proposal crowds strata where it puts mass (σ < 0.25)
    # iid: draws fall in the density's equal-mass bands, any number per band
    rule_iid = DrawRule(seed=3, scheme="iid", k=4, density="uniform")
    assert stratum_of(rule_iid, np.array([0.1, 0.12, 0.9, 0.5])).tolist() == [0, 0, 3, 2]


def test_stratum_terms_add_up_to_the_score_for_every_preconditioner() -> None:
    rng = np.random.default_rng(1)
    d, k = 12, 4
    parts = rng.standard_normal((k, d))  # (K, D) one clip's weighted per-draw parts
    total = parts.sum(axis=0)
    q = rng.standard_normal(d)
    acc = GramAccumulator(dim=d, blocks=[8, 4])
    acc.update(rng.standard_normal((30, d)))
    rule = DrawRule(seed=0, scheme="stratified", k=k, density="uniform")
    eps64 = float(np.finfo(np.float64).eps)
    for pre in (
        Preconditioner(d, [8, 4]),
        CosinePreconditioner(d, [8, 4]),
        NormalizePreconditioner(d, [8, 4]),
        acc.finalize(1e-2),
    ):
        # prepare_train rounds ψ to float32 (≤ eps32/2 relative per entry); the float64 parts carry
        # (K + d)·eps64 of their own sums (the trak inverse's d-term products, the K-term sum)
        psi_i = pre.prepare_train(total[None])[0].astype(np.float64)
        psi_parts = pre.prepare_train_parts(parts, total)
        mag = np.abs(psi_parts).sum(axis=0)  # (D,) Σ_k |part_kj|
        bound = 0.5 * EPS32 * np.abs(psi_i) + (k + d) * eps64 * mag
        assert np.all(np.abs(psi_parts.sum(axis=0) - psi_i) <= bound), pre.kind
        strata = stratum_split(q, psi_parts, np.zeros(k), rule)
        tol = float(np.abs(q) @ bound) + d * eps64 * float(np.abs(q) @ mag)
        assert abs(sum(x["score"] for x in strata) - float(q @ psi_i)) <= tol, pre.kind
        assert [x["draws"] for x in strata] == [1] * k


def test_score_explain_splits_every_result_over_timestep_strata(
    featurized_run: Path, demo_data: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """by_stratum (K entries, σ intervals tiling [0, 1]) sums to the result's score: the per-draw
    parts are recomputed from the cached latent with the index's draws. Tolerance as in
    tests/attrib/test_gradients.py: per-draw rows vs the batched K-draw feature differ by float32
    contraction order, rel ≤ C·eps32·sqrt(n) per layer block with n the longest contraction
    (widest layer's out·in_aug, or K·tokens); for unit vectors (a cosine index) the score moves by
    at most twice that, plus the float32 inner product's D·eps32."""
    run = tmp_path / "run"
    shutil.copytree(featurized_run, run)
    query = sorted((demo_data / "videos").glob("*.mp4"))[2]
    doc = run_score(ScoreConfig(run=run, queries=[query], prompt="a clip", top_k=3, workers=0, device="cpu",
                                explain=True))  # fmt: skip
    est, dim = doc["index"]["estimator"], doc["index"]["dim"]
    k = est["draws"]
    t = load_transformer(str(tiny_model_dir))
    widest = max(m.out_features * (m.in_features + 1) for m in t.modules() if isinstance(m, torch.nn.Linear))
    enc = doc["index"]["encode"]
    p_t, p_h, p_w = t.config.patch_size
    tokens = ((enc["frames"] - 1) // 4 + 1) // p_t * (enc["height"] // 8 // p_h) * (enc["width"] // 8 // p_w)
    n = max(widest, k * tokens)
    tol = 2 * 8 * EPS32 * math.sqrt(n) + dim * EPS32
    for r in doc["queries"][0]["results"]:
        strata = r["explain"]["by_stratum"]
        assert [x["stratum"] for x in strata] == list(range(k))
        assert strata[0]["sigma_lo"] == 0.0 and strata[-1]["sigma_hi"] == 1.0
        assert all(a["sigma_hi"] == b["sigma_lo"] for a, b in zip(strata, strata[1:]))
        assert r["explain"]["by_stratum_total"] == sum(x["score"] for x in strata)
        assert r["explain"]["by_stratum_total"] == pytest.approx(r["score"], rel=0, abs=tol)


def test_strata_of_an_unknown_scheme_are_refused() -> None:
    """No fallback: a scheme without a branch is not read as "draw k lies in stratum k"."""
    rule = DrawRule(seed=3, scheme="stratified", k=4, density="uniform")
    object.__setattr__(rule, "scheme", "sobol")  # past DrawRule's own check
    with pytest.raises(ValueError, match=r"unknown timestep scheme 'sobol'; expected one of iid, "):
        stratum_of(rule, np.array([0.1, 0.3, 0.6, 0.9]))
    with pytest.raises(ValueError, match=r"unknown timestep scheme 'sobol'"):
        strata_edges(rule)
