"""LoRA features: the hooks on an adapter's lora_A / lora_B Linears against plain autograd.

With a LoRA adapter on the tiny Wan transformer, `build_projector(..., lora=True)` keeps the exact
gradient of the A and B parameters when it is small (identity projection, D = the adapter's parameter
count) and otherwise keeps each layer's rank side exact and projects its wide side. Both are checked
against the reference: `torch.autograd.grad` of the clip objective w.r.t. the A/B weights (exact), or
that gradient times the projector's Kronecker matrix (projected).

Tolerances as in test_gradients.py: per layer block ‖a − b‖/‖b‖ ≤ C · eps(float32) · sqrt(n), n the
longest float32 contraction that differs between the two paths (a layer's out·in_aug, or the rows ·
tokens summed by the hooks); a wrong slot, a transposed A or B, or a missed scaling gives errors of
order 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carv_attrib.attrib.featurizer import build_projector
from carv_attrib.attrib.gradients import ClipDraws, kron_features
from carv_attrib.attrib.projection import (
    LORA_EXACT_MAX_DIM,
    LORA_PATTERNS,
    DenseProjector,
    KronProjector,
    kron_matrix,
    lora_projection,
    select_linear_layers,
)
from carv_attrib.carv.objective import clip_objective
from carv_attrib.errors import UsageError
from carv_attrib.models.lora import add_lora, lora_layers

from .helpers import LATENT, make_data, tiny_wan

B, K = 3, 4
EPS32 = torch.finfo(torch.float32).eps
C = 8.0
TOKENS = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)


@pytest.fixture(scope="module")
def adapted() -> nn.Module:
    """The tiny transformer with a rank-2 adapter whose B is random (B = 0 would zero every A gradient)."""
    t = tiny_wan()
    add_lora(t, rank=2, seed=3)
    with torch.no_grad():
        for i, (name, prm) in enumerate(t.named_parameters()):
            if "lora_B" in name:
                prm.copy_(0.1 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(i)))
    t.eval()
    return t


def _clips(n: int, k: int, seed: int) -> list[ClipDraws]:
    d = make_data(n, k, seed=seed)
    w = d["w"] * torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    return [ClipDraws(d["z"][b], d["ctx"][b : b + 1], d["sigma"][b], w[b], d["eps"][b]) for b in range(n)]


def _autograd_lora_grads(model: nn.Module, batch: list[ClipDraws]) -> torch.Tensor:
    """(B, p): per clip, torch.autograd.grad of its objective w.r.t. each lora_A / lora_B weight, flattened
    row-major in `lora_layers` order (the reference, no hooks)."""
    layers = lora_layers(model)
    params = [m.weight for _, m in layers]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    rows = []
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for clip in batch:
            obj, _ = clip_objective(model, clip.latent, clip.context, clip.sigma, clip.eps, clip.weights)
            grads = torch.autograd.grad(obj, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return torch.stack(rows)


def _n(layers, rows: int) -> int:
    return max(max(m.out_features * m.in_features for _, m in layers), rows * TOKENS)


def _assert_blocks(proj: KronProjector, got: torch.Tensor, ref: torch.Tensor, n: int) -> None:
    tol = C * EPS32 * math.sqrt(n)
    start, bad = 0, {}
    for name, k_out, k_in in proj.layer_dims:
        sl = slice(start, start + k_out * k_in)
        a, b = got[:, sl].double(), ref[:, sl].double()
        err = float((a - b).norm() / b.norm())
        if not err <= tol:
            bad[name] = err
        start = sl.stop
    assert start == got.shape[1] == ref.shape[1]
    assert not bad, f"{len(bad)} LoRA blocks exceed rtol {tol:.3g} (n={n}): {bad}"


def test_exact_lora_feature_is_the_autograd_gradient_of_a_and_b(adapted: nn.Module) -> None:
    proj = build_projector("kron", adapted, lora=True)
    layers = lora_layers(adapted)
    n_params = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
    assert isinstance(proj, KronProjector) and proj.exact
    assert proj.dim == proj.grad_dim == n_params  # the feature is the gradient itself
    # per layer: A (r, in), B (out, r), no bias
    for (name, m), (_, k_out, k_in) in zip(layers, proj.layer_dims):
        assert m.bias is None and (k_out, k_in) == (m.out_features, m.in_features)
        assert m.out_features == 2 if ".lora_A." in name else m.in_features == 2
    spec = proj.spec()
    assert spec["lora"] is True and spec["patterns"] == list(LORA_PATTERNS)
    assert all(e["exact_out"] and e["exact_in"] for e in spec["layers"])

    batch = _clips(B, K, seed=5)
    feats, _ = kron_features(adapted, proj, batch)
    ref = _autograd_lora_grads(adapted, batch)
    assert feats.shape == ref.shape == (B, n_params)
    assert all(float(ref[:, sl].norm()) > 0 for sl in [slice(0, 8)])  # A's gradient is not zero (B ≠ 0)
    _assert_blocks(proj, feats, ref, _n(layers, K))
    # the base weights stay frozen and without gradients
    assert all(p.grad is None for p in adapted.parameters())


def test_projected_lora_feature_keeps_the_rank_side_exact(adapted: nn.Module) -> None:
    layers = lora_layers(adapted)
    p = sum(m.weight.numel() for _, m in layers)
    proj = build_projector("kron", adapted, lora=True, proj_dim=p // 4)
    assert not proj.exact and proj.dim <= p // 4
    spec = proj.spec()
    for e in spec["layers"]:
        if ".lora_A." in e["name"]:
            assert e.get("exact_out") and e["k_out"] == 2 and e["k_in"] < e["in_aug"]
        else:
            assert e.get("exact_in") and e["k_in"] == 2 and e["k_out"] < e["out"]
    batch = _clips(B, K, seed=6)
    feats, _ = kron_features(adapted, proj, batch)
    ref = _autograd_lora_grads(adapted, batch) @ kron_matrix(proj)
    _assert_blocks(proj, feats, ref, _n(layers, K))
    # rebuilt from its spec (what score does): the same matrices, the same features
    again = KronProjector.from_spec(adapted, spec)
    assert again.spec() == spec
    torch.testing.assert_close(kron_features(adapted, again, batch)[0], feats, rtol=0, atol=0)


def test_dense_lora_projector_projects_the_same_gradient(adapted: nn.Module) -> None:
    """--projector dense --lora: the reference path (parameter gradients of A and B only, times one JL
    matrix) gives the exact LoRA gradient times that matrix, and leaves requires_grad as it was."""
    proj = build_projector("dense", adapted, lora=True, proj_dim=64)
    assert isinstance(proj, DenseProjector) and proj.dim == 64
    assert proj.spec()["layers"] == [
        {"name": n, "out": m.out_features, "in_aug": m.in_features} for n, m in lora_layers(adapted)
    ]
    before = [p.requires_grad for p in adapted.parameters()]
    batch = _clips(2, K, seed=7)
    feats, _ = proj.batch_features(adapted, batch)
    assert [p.requires_grad for p in adapted.parameters()] == before
    ref = (_autograd_lora_grads(adapted, batch).double() @ proj.matrix().double()).float()
    # one contraction over the p gradient entries differs: tolerance C·eps·sqrt(p)
    p = proj.grad_dim
    err = float((feats.double() - ref.double()).norm() / ref.double().norm())
    assert err <= C * EPS32 * math.sqrt(max(p, _n(lora_layers(adapted), K))), err


def test_lora_projection_rules(adapted: nn.Module) -> None:
    layers = lora_layers(adapted)
    p = sum(m.weight.numel() for _, m in layers)
    assert p < LORA_EXACT_MAX_DIM
    shapes, exact = lora_projection(layers)
    assert not shapes and all(v == (True, True) for v in exact.values())  # small: exact
    shapes, exact = lora_projection(layers, proj_dim=p)  # fits exactly
    assert all(v == (True, True) for v in exact.values())
    shapes, exact = lora_projection(layers, kron_dims=(4, 3))  # per layer: k_in 3 for A, k_out 4 for B
    for name, _ in layers:
        if ".lora_A." in name:
            assert shapes[name] == (2, 3) and exact[name] == (True, False)
        else:
            assert shapes[name] == (4, 2) and exact[name] == (False, True)


def test_without_lora_the_projector_is_unchanged(adapted: nn.Module) -> None:
    """The default selection ("blocks.*") of a model without adapter builds the same spec as before:
    no "lora" or "exact_*" keys, so earlier runs keep their fingerprints."""
    base = tiny_wan()
    spec = build_projector("kron", base).spec()
    assert "lora" not in spec and not any("exact_in" in e or "exact_out" in e for e in spec["layers"])
    legacy = KronProjector(base, select_linear_layers(base), seed=0, patterns=["blocks.*"])
    assert spec == legacy.spec()
    with pytest.raises(UsageError, match="no LoRA adapter"):
        build_projector("kron", base, lora=True)


def test_exact_sides_on_layers_with_bias_give_flat_grad() -> None:
    """`exact` on ordinary Linears (bias included, the merged model's layers in bench/lora_lds.py):
    the feature is flat_grad's [∇W | ∇b], row-major, and the spec round-trips."""
    from carv_attrib.attrib.gradients import dense_features

    base = tiny_wan()
    layers = select_linear_layers(base)
    exact = {n: (True, True) for n, _ in layers}
    proj = KronProjector(base, layers, exact=exact, patterns=["blocks.*"])
    assert proj.exact and proj.dim == proj.grad_dim
    assert any(m.bias is not None for _, m in layers)

    class _Identity:
        def project(self, g: torch.Tensor) -> torch.Tensor:
            return g.float()

    batch = _clips(2, K, seed=8)
    feats, _ = kron_features(base, proj, batch)
    ref, _ = dense_features(base, layers, _Identity(), batch)
    _assert_blocks(proj, feats, ref, _n(layers, K))
    again = KronProjector.from_spec(base, proj.spec())
    assert again.exact and again.spec() == proj.spec()
