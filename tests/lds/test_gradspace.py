"""Features from full gradients equal the tool's own: kron from G is KronProjector's features, dense
from G is DenseProjector's, and scores from a Gram are the preconditioners' scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carv_attrib.attrib.featurizer import Featurizer, build_projector
from carv_attrib.carv.draws import DrawRule
from carv_attrib.lds.gradspace import (
    LAYER_SETS,
    FeatureSpec,
    describe,
    features,
    gram,
    linear_blocks,
    other_positions,
    scores_from_gram,
)
from carv_attrib.lds.reference import exact_gradients, reference_rule
from carv_attrib.search.precondition import fit_preconditioner
from carv_attrib.store.latents import CachedClip
from tests.attrib.helpers import CTX_DIM, CTX_LEN, LATENT, tiny_wan

EPS32 = float(np.finfo(np.float32).eps)


def _clips(n: int, seed: int = 0) -> list[CachedClip]:
    g = torch.Generator().manual_seed(seed)
    return [
        CachedClip(
            clip_id=10 + i,
            vid=f"v{i}",
            latent=torch.randn(*LATENT, generator=g),
            text_emb=torch.randn(CTX_LEN, CTX_DIM, generator=g),
        )
        for i in range(n)
    ]


def _sum_tol(terms: int, scale: float) -> float:
    """A float32 bound for a sum of `terms` products of magnitude ≤ scale (γ_n = n·ε)."""
    return terms * EPS32 * scale


@pytest.mark.parametrize(
    ("noise", "layers"), [("shared", "blocks"), ("per-clip", "blocks"), ("shared", "all-linear")]
)
def test_kron_from_gradients_is_the_tools_kron_feature(noise: str, layers: str) -> None:
    t = tiny_wan()
    clips = _clips(3)
    rule = DrawRule(seed=1, scheme="stratified", k=4, density="uniform", noise=noise)
    globs = list(LAYER_SETS[layers])
    proj = build_projector("kron", t, globs, seed=5, kron_dims=(4, 3))
    fz = Featurizer([t], [proj], rule, "loss", "cpu")
    tool, _, _ = fz.features([(c.clip_id, c.latent, c.text_emb) for c in clips])  # (3, D)
    G = exact_gradients(t, clips, rule)  # (3, P)
    mine = features(G, t, FeatureSpec(layers=layers, projection="kron", k_out=4, k_in=3), seed=5)
    assert mine.shape == tuple(tool.shape)
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2) * rule.k
    widest = max(b.out + b.in_aug for b in linear_blocks(t, globs))
    scale = float(np.abs(mine).max())
    np.testing.assert_allclose(mine, tool.double().numpy(), rtol=0, atol=_sum_tol(tokens + widest, scale))


def test_dense_from_gradients_is_the_tools_dense_feature() -> None:
    t = tiny_wan()
    clips = _clips(2, seed=1)
    rule = DrawRule(seed=2, scheme="iid", k=3, density="uniform")
    proj = build_projector("dense", t, ["*"], seed=3, proj_dim=40)
    tool, _, _ = Featurizer([t], [proj], rule, "loss", "cpu").features(
        [(c.clip_id, c.latent, c.text_emb) for c in clips]
    )
    G = exact_gradients(t, clips, rule)
    mine = features(G, t, FeatureSpec(layers="all-linear", projection="dense", dim=40), seed=3)
    p = describe(FeatureSpec(layers="all-linear"), t)["grad_dim"]
    scale = float(np.abs(G).max()) * 4.0 / np.sqrt(40)  # |entries| of P ≤ ~4/sqrt(dim)
    np.testing.assert_allclose(mine, tool.double().numpy(), rtol=0, atol=_sum_tol(p, scale))


def test_layer_sets_partition_the_parameters() -> None:
    t = tiny_wan()
    total = sum(p.numel() for p in t.parameters())
    lin = describe(FeatureSpec(layers="all-linear"), t)["grad_dim"]
    assert lin + other_positions(t).size == total == describe(FeatureSpec(layers="all"), t)["grad_dim"]
    assert describe(FeatureSpec(layers="blocks"), t)["grad_dim"] < lin
    G = exact_gradients(t, _clips(2), reference_rule("uniform", k=2))
    assert features(G, t, FeatureSpec(layers="all")) is G


def test_reference_rules_share_or_split_draws() -> None:
    crn, per = reference_rule("shift:3", k=4), reference_rule("shift:3", k=4, draws="per-clip")
    assert crn.stream_for(5) == crn.stream_for(9) and per.stream_for(5) != per.stream_for(9)
    assert crn.scheme == "iid" and crn.density == per.density
    with pytest.raises(ValueError, match="per-clip"):
        reference_rule("uniform", draws="mine")


@pytest.mark.parametrize("kind", ["identity", "cosine", "trak"])
def test_scores_from_gram_equal_the_preconditioners(kind: str) -> None:
    rng = np.random.default_rng(0)
    n, q, d = 12, 3, 7
    F = rng.standard_normal((n + q, d)) * rng.uniform(0.1, 5, (n + q, 1))
    pre = fit_preconditioner(kind, F[:n], dim=d, lambda_rel=0.3)
    want = pre.prepare_train(F[:n]).astype(np.float64) @ pre.prepare_query(F[n:]).astype(np.float64).T
    got = scores_from_gram(gram(F), n, kind, lambda_rel=0.3, dim=d)
    # the tool stores float32 rows: its scores carry float32 rounding of d-term dot products
    tol = _sum_tol(d, float(np.abs(want).max()) * 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_normalize_interpolates_grad_dot_and_cosine() -> None:
    rng = np.random.default_rng(1)
    F = rng.standard_normal((9, 4))
    K = gram(F)
    cos = scores_from_gram(K, 6, "cosine")
    np.testing.assert_allclose(scores_from_gram(K, 6, "normalize", alpha=1.0), cos)
    nq = np.linalg.norm(F[6:], axis=1)
    np.testing.assert_allclose(scores_from_gram(K, 6, "normalize", alpha=0.0), K[:6, 6:] / nq[None, :])
