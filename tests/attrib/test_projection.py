"""Projection: Kronecker hooks == dense gradient × kron(P_out, P_in); dense chunking; JL; seeds."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from carv_attrib.attrib.gradients import flat_grad
from carv_attrib.attrib.projection import (
    DEFAULT_PATTERNS,
    DenseProjector,
    KronProjector,
    kron_matrix,
    layer_matrices,
    projector_from_spec,
    select_linear_layers,
    shapes_for_total_dim,
)

from .helpers import flow_losses, make_data, per_example_flat_grads, rel_err, wan_call

B, K = 4, 3


@pytest.fixture(scope="module")
def grads(wan):
    """Per-example flattened [∇W|∇b] of every blocks.* Linear (plain autograd) and the data."""
    layers = select_linear_layers(wan)
    data = make_data(10, K, seed=1)
    return layers, data, per_example_flat_grads(wan, layers, data)  # (10, p)


def _kron(wan, layers) -> KronProjector:
    # Uneven shapes (k_out != k_in, one layer overridden) so a transposed block would show.
    return KronProjector(wan, layers, seed=3, k_in=3, k_out=2, shapes={"blocks.0.ffn.net.0.proj": (4, 5)})


def _per_layer_rel_err(proj: KronProjector, feats: torch.Tensor, ref: torch.Tensor) -> float:
    errs, start = [], 0
    for _, k_out, k_in in proj.layer_dims:
        sl = slice(start, start + k_out * k_in)
        errs.append(rel_err(feats[:, sl], ref[:, sl]))
        start = sl.stop
    return max(errs)


def test_select_linear_layers(wan):
    layers = select_linear_layers(wan)
    assert DEFAULT_PATTERNS == ("blocks.*",)
    assert len(layers) == 2 * 10  # 2 blocks × (4 attn1 + 4 attn2 + 2 ffn)
    assert [n for n, _ in layers[:10]] == [
        f"blocks.0.{s}"
        for s in (
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "ffn.net.0.proj",
            "ffn.net.2",
        )
    ]
    assert [n for n, _ in select_linear_layers(wan, ["blocks.1.attn2.to_[kv]"])] == [
        "blocks.1.attn2.to_k",
        "blocks.1.attn2.to_v",
    ]
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        select_linear_layers(wan, ["decoder.*"])


def test_kron_equals_dense_kronecker_matrix_on_tiny_wan(wan, grads):
    layers, data, g = grads
    sub = {k: v[:B] for k, v in data.items()}
    proj = _kron(wan, layers)
    ref = g[:B] @ kron_matrix(proj)  # (B, D)
    assert proj.dim == 19 * 6 + 20 and ref.shape == (B, proj.dim)

    # One forward per sample (slot = int), K draws each, the text context (1, L, D) broadcast.
    with proj.capture(num_slots=B):
        assert not any(p.requires_grad for p in wan.parameters())
        total = 0.0
        for b in range(B):
            proj.slot = b
            total = total + flow_losses(wan_call(wan), *(sub[k][b : b + 1] for k in sub)).sum()
        total.backward()
    per_sample = proj.features()
    assert all(p.requires_grad for p in wan.parameters())  # restored
    assert per_sample.dtype == torch.float32 and per_sample.shape == (B, proj.dim)
    assert _per_layer_rel_err(proj, per_sample, ref) < 1e-5

    # One batched forward over B·K rows; per-row slot ids, one context per row.
    with proj.capture(num_slots=B):
        proj.slot = torch.arange(B).repeat_interleave(K)
        flow_losses(wan_call(wan), **sub).sum().backward()
    batched = proj.features()
    assert _per_layer_rel_err(proj, batched, ref) < 1e-5
    assert all(w.grad is None for w in wan.parameters())  # nothing formed the weight gradient


def test_kron_on_2d_inputs_and_no_bias():
    """(N, in) inputs, a Linear without bias, slots out of order, a no-grad pass ignored."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 1))
    layers = select_linear_layers(mlp, ["*"])
    x = torch.randn(6, 5)
    proj = KronProjector(mlp, layers, seed=0, k_in=3, k_out=2, kind="rademacher")
    assert proj.grad_dim == 7 * 6 + 6 * 7 + 1 * 7

    ref = []
    for i in range(6):
        mlp.zero_grad()
        mlp(x[i : i + 1]).pow(2).sum().backward()
        ref.append(flat_grad(layers))
    slots = torch.tensor([2, 0, 1, 2, 0, 1])
    expected = torch.zeros(3, proj.dim).index_add_(0, slots, torch.stack(ref) @ kron_matrix(proj))

    with proj.capture(num_slots=3):
        proj.slot = slots
        with torch.no_grad():
            mlp(x)  # evaluation pass inside capture: no hooks fire, no error
        mlp(x).pow(2).sum().backward()
    assert rel_err(proj.features(), expected) < 1e-5


def test_broadcast_input_with_per_row_slots_is_refused(wan):
    data = make_data(2, K, seed=2)
    data["ctx"] = data["ctx"][:1]  # one (1, L, D) context broadcast over the rows of two samples
    proj = KronProjector(wan, select_linear_layers(wan), k_in=2, k_out=2)
    with proj.capture(num_slots=2), pytest.raises(ValueError, match="broadcast input"):
        proj.slot = torch.arange(2).repeat_interleave(K)
        flow_losses(wan_call(wan), **data)
    assert all(p.requires_grad for p in wan.parameters())


def test_capture_misuse_is_explained(wan):
    proj = KronProjector(wan, select_linear_layers(wan), k_in=2, k_out=2)
    with pytest.raises(RuntimeError, match="no features yet"):
        proj.features()
    data = make_data(1, K, seed=0)
    with proj.capture(num_slots=1):
        with pytest.raises(ValueError, match="slot must lie"):
            proj.slot = 1
        with pytest.raises(RuntimeError, match="set KronProjector.slot"):
            flow_losses(wan_call(wan), **data)
        proj.slot = 0
        loss = flow_losses(wan_call(wan), **data).sum()
    with pytest.raises(RuntimeError, match="after its capture"):
        loss.backward()


def test_spec_round_trip_and_total_dim(wan):
    layers = select_linear_layers(wan)
    shapes = shapes_for_total_dim(layers, 1000)  # floor(sqrt(1000 / 20)) = 7
    assert set(shapes.values()) == {(7, 7)}
    assert shapes_for_total_dim(layers, 5) == {n: (1, 1) for n, _ in layers}
    proj = KronProjector(wan, layers, seed=5, shapes=shapes, patterns=["blocks.*"])
    assert proj.dim == 20 * 49
    spec = json.loads(json.dumps(proj.spec()))
    assert spec["kind"] == "kron" and spec["patterns"] == ["blocks.*"] and spec["dim"] == 980
    again = KronProjector.from_spec(wan, spec)
    assert again.layer_dims == proj.layer_dims
    for (_, a_in, a_out), (_, b_in, b_out) in zip(proj.matrices(), again.matrices(), strict=True):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


def test_layer_matrices_depend_on_seed_name_role_only():
    a_in, a_out = layer_matrices(0, "blocks.0.attn1.to_q", 25, 25, 4, 4)
    b_in, b_out = layer_matrices(0, "blocks.0.attn1.to_q", 25, 25, 4, 4)
    assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    assert not torch.equal(a_in, a_out)  # role enters the seed
    assert not torch.equal(a_in, layer_matrices(0, "blocks.0.attn1.to_k", 25, 25, 4, 4)[0])
    assert not torch.equal(a_in, layer_matrices(1, "blocks.0.attn1.to_q", 25, 25, 4, 4)[0])
    assert a_in.dtype == torch.float32
    r_in, _ = layer_matrices(0, "x", 30, 3, 16, 2, kind="rademacher")
    assert set(r_in.unique().tolist()) == {-0.25, 0.25}  # ±1/sqrt(16)


def _fingerprint() -> str:
    p_in, p_out = layer_matrices(7, "blocks.3.ffn.net.2", 33, 24, 5, 3)
    dense = DenseProjector([("l", nn.Linear(9, 4))], seed=7, dim=6, chunk_rows=11).matrix()
    return hashlib.sha256(
        p_in.numpy().tobytes() + p_out.numpy().tobytes() + dense.numpy().tobytes()
    ).hexdigest()


def test_matrices_are_identical_in_another_process():
    code = "from tests.attrib.test_projection import _fingerprint; print(_fingerprint())"
    root = Path(__file__).resolve().parents[2]  # so `tests.attrib` imports from any cwd
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == _fingerprint()


def test_dense_chunked_equals_full_matrix(wan, grads):
    layers, _, g = grads
    proj = DenseProjector(layers, seed=1, dim=16, chunk_rows=1000)  # p = 12,784 → 13 chunks
    assert proj.grad_dim == g.shape[1]
    full = proj.matrix()
    assert full.shape == (g.shape[1], 16)
    assert rel_err(proj.project(g), g @ full) < 1e-5
    assert rel_err(proj.project(g[0]), g[0] @ full) < 1e-5  # (p,) input
    assert torch.equal(DenseProjector(layers, seed=1, dim=16, chunk_rows=1000).matrix(), full)
    assert not torch.equal(DenseProjector(layers, seed=2, dim=16, chunk_rows=1000).matrix(), full)
    spec = json.loads(json.dumps(proj.spec()))
    assert spec["grad_dim"] == g.shape[1]
    assert torch.equal(DenseProjector.from_spec(wan, spec).matrix(), full)
    with pytest.raises(ValueError, match="expected a gradient"):
        proj.project(g[:, :-1])


def _gram_errors(projected: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|⟨Pg_i, Pg_j⟩ − ⟨g_i, g_j⟩| / (‖g_i‖ ‖g_j‖) for all pairs."""
    g64, p64 = g.double(), projected.double()
    norms = g64.norm(dim=1)
    return ((p64 @ p64.T - g64 @ g64.T) / torch.outer(norms, norms)).abs()


def test_jl_projected_inner_products_converge(wan, grads):
    layers, _, g = grads
    dense_med, kron_med = {}, {}
    for k in (4, 16, 64):
        errs = [_gram_errors(DenseProjector(layers, seed=s, dim=k).project(g), g) for s in range(4)]
        dense_med[k] = torch.stack(errs).median().item()
        # Std of a Gaussian JL inner product <= sqrt(2/k)·‖g_i‖‖g_j‖: a 4-sigma entrywise bound.
        assert errs[0].max() < 4 * (2 / k) ** 0.5
        side = int(k**0.5)  # k_out = k_in = sqrt(k): k features per layer
        kerrs = [
            _gram_errors(g @ kron_matrix(KronProjector(wan, layers, seed=s, k_in=side, k_out=side)), g)
            for s in range(4)
        ]
        kron_med[k] = torch.stack(kerrs).median().item()
    assert dense_med[64] < dense_med[16] < dense_med[4] and dense_med[64] * 2 < dense_med[4]
    assert kron_med[64] < kron_med[4] / 2


def test_projector_from_spec_refuses_an_unknown_kind(wan) -> None:
    """No fallback: a spec of another kind is not rebuilt as a dense projector."""
    spec = DenseProjector(select_linear_layers(wan), seed=0, dim=8).spec()
    assert isinstance(projector_from_spec(wan, spec), DenseProjector)
    with pytest.raises(ValueError, match=r"unknown projector kind 'fastfood'; expected one of kron, dense"):
        projector_from_spec(wan, {**spec, "kind": "fastfood"})
