"""gradients.py: batched hook features (`kron_features`) against the per-clip reference
(`dense_features`), batch invariance of the hook slots, linearity of `per_draw_features`, and the
bookkeeping of the reference path (requires_grad restored, no .grad left behind).

test_projection.py already checks the projector hooks against `flat_grad @ kron_matrix` on raw
`flow_losses`; here the subject is the clip-level API on top of them (`ClipDraws`, the w_k/K folding
of `clip_objective`, one backward over B clips, per-draw rows).

Tolerances. Every comparison is per layer block (a block is k_out·k_in features), norm-wise:
‖a − b‖ / ‖b‖ ≤ C · eps(float32) · sqrt(n). Both sides are exact functions of the same float32
forward/backward, so they differ only by the rounding of the contractions that differ between them;
for random rounding errors a length-n float32 dot product has a relative error ~ eps·sqrt(n). The
longest such contraction here is the projection of one layer's gradient, Σ over out · in_aug entries
of [∇W|b] (dense) or over the rows·tokens of the hooks, so n = max(out · in_aug, rows · tokens) of
the tiny model (see `_reduction_length`; n = 800 here, tolerance 3.4e-5). C = 8 covers the few
chained contractions (δ → P_outᵀδ, x → P_inᵀx, the token sum); the worst error measured is
0.8 · eps · sqrt(n) (per-draw rows against the K-draw feature), while a wrong slot, a dropped weight
or a transposed block gives errors of order 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carv_attrib.attrib.gradients import ClipDraws, dense_features, kron_features, per_draw_features
from carv_attrib.attrib.projection import DenseProjector, KronProjector, kron_matrix, select_linear_layers
from carv_attrib.carv.objective import clip_objective

from .helpers import LATENT, make_data

B, K = 3, 4
EPS32 = torch.finfo(torch.float32).eps
C = 8.0
# Tokens per transformer row: T · (H/2) · (W/2) with the tiny model's (1, 2, 2) patches; the
# cross-attention K/V layers see the text context's CTX_LEN tokens instead (fewer).
TOKENS = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)


def _reduction_length(layers, rows: int) -> int:
    """n of the module docstring: the longest float32 contraction that differs between two paths."""
    widest = max(m.out_features * (m.in_features + (m.bias is not None)) for _, m in layers)
    return max(widest, rows * TOKENS)


def _tol(n: int) -> float:
    return C * EPS32 * math.sqrt(n)


def _block_errors(proj: KronProjector, got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """{layer name: ‖got − ref‖ / ‖ref‖} over each layer's block of features (float64 arithmetic)."""
    out, start = {}, 0
    for name, k_out, k_in in proj.layer_dims:
        sl = slice(start, start + k_out * k_in)
        a, b = got[..., sl].double(), ref[..., sl].double()
        out[name] = float((a - b).norm() / b.norm())
        start = sl.stop
    assert start == got.shape[-1] == ref.shape[-1]
    return out


def _assert_close_blocks(proj: KronProjector, got: torch.Tensor, ref: torch.Tensor, n: int) -> None:
    tol = _tol(n)
    errs = _block_errors(proj, got, ref)
    bad = {k: v for k, v in errs.items() if not v <= tol}  # `not <=` also catches NaN
    assert not bad, f"{len(bad)} layer blocks exceed rtol {tol:.3g} (n={n}): {bad}"


class _KronAsDense:
    """A DenseProjector stand-in whose matrix is the Kronecker block matrix of a KronProjector, so
    `dense_features` (plain autograd, flattened gradient) computes exactly what the hooks should."""

    def __init__(self, proj: KronProjector) -> None:
        self.matrix = kron_matrix(proj)  # (p, D)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return g.float() @ self.matrix


def _clips(n: int, k: int, seed: int) -> list[ClipDraws]:
    """n clips with their own K draws and clearly different importance weights per clip."""
    d = make_data(n, k, seed=seed)
    w = d["w"] * torch.arange(1, n + 1, dtype=torch.float32)[:, None]  # clip b's weights scaled by b+1
    return [ClipDraws(d["z"][b], d["ctx"][b : b + 1], d["sigma"][b], w[b], d["eps"][b]) for b in range(n)]


def _proj(wan: nn.Module, layers) -> KronProjector:
    # k_out != k_in and one overridden layer, so a transposed or misplaced block cannot pass.
    return KronProjector(wan, layers, seed=11, k_in=3, k_out=2, shapes={"blocks.1.attn2.to_v": (4, 5)})


@pytest.fixture(scope="module")
def layers(wan):
    return select_linear_layers(wan)


@pytest.mark.parametrize("output_fn", ["loss", "sqnorm"])
def test_kron_features_equal_dense_features_with_kronecker_matrix(wan, layers, output_fn):
    proj = _proj(wan, layers)
    batch = _clips(B, K, seed=5)
    feats, losses = kron_features(wan, proj, batch, output_fn)
    ref, ref_losses = dense_features(wan, layers, _KronAsDense(proj), batch, output_fn)

    assert feats.shape == ref.shape == (B, proj.dim)
    assert feats.dtype == ref.dtype == torch.float32 and feats.device.type == "cpu"
    assert losses.shape == ref_losses.shape == (B, K)
    # Each clip's rows (K of them) go through the hooks at once.
    _assert_close_blocks(proj, feats, ref, _reduction_length(layers, K))
    # The losses are the same forward in both paths: identical up to the mean over C·T·H·W entries.
    n_loss = math.prod(LATENT)
    torch.testing.assert_close(losses, ref_losses, rtol=C * EPS32 * math.sqrt(n_loss), atol=0)


def test_losses_are_per_draw_and_unweighted(wan, layers):
    """losses (B, K) are ℓ_k of each draw, not w_k·ℓ_k: the weights only enter the gradient."""
    proj = _proj(wan, layers)
    batch = _clips(B, K, seed=6)
    _, losses = kron_features(wan, proj, batch)
    assert losses.shape == (B, K) and losses.dtype == torch.float32
    assert torch.isfinite(losses).all() and (losses > 0).all()
    with torch.no_grad():
        expected = torch.stack(
            [clip_objective(wan, c.latent, c.context, c.sigma, c.eps, c.weights)[1] for c in batch]
        )
    n_loss = math.prod(LATENT)
    torch.testing.assert_close(losses, expected, rtol=C * EPS32 * math.sqrt(n_loss), atol=0)


def test_batch_of_clips_equals_each_clip_alone(wan, layers):
    """One backward over B clips with different weights = B separate calls, slot by slot; the
    feature of a clip does not depend on its neighbours or on its position in the batch."""
    proj = _proj(wan, layers)
    batch = _clips(B, K, seed=7)
    feats, losses = kron_features(wan, proj, batch)
    alone = [kron_features(wan, proj, [clip]) for clip in batch]
    n = _reduction_length(layers, K)
    for b, (f1, l1) in enumerate(alone):
        assert f1.shape == (1, proj.dim) and l1.shape == (1, K)
        _assert_close_blocks(proj, feats[b : b + 1], f1, n)
        torch.testing.assert_close(losses[b : b + 1], l1, rtol=0, atol=0)  # the same forward

    perm = [2, 0, 1]
    feats_p, losses_p = kron_features(wan, proj, [batch[i] for i in perm])
    _assert_close_blocks(proj, feats_p, feats[perm], n)
    torch.testing.assert_close(losses_p, losses[perm], rtol=0, atol=0)

    # The weights reach the right slot: clips differ, and scaling one clip's weights scales only
    # its feature (φ is linear in w), leaving the others untouched.
    scaled = list(batch)
    scaled[1] = ClipDraws(
        batch[1].latent, batch[1].context, batch[1].sigma, 3 * batch[1].weights, batch[1].eps
    )
    feats_s, _ = kron_features(wan, proj, scaled)
    _assert_close_blocks(proj, feats_s[[0, 2]], feats[[0, 2]], n)
    _assert_close_blocks(proj, feats_s[1:2], 3 * feats[1:2], n)
    assert all(p.requires_grad for p in wan.parameters())  # capture() restored the flags
    assert all(p.grad is None for p in wan.parameters())  # the hooks never formed a weight gradient


@pytest.mark.parametrize("per_backward", [1, 2, 3])
def test_draws_per_backward_give_the_same_features(wan, layers, per_backward):
    """Chunking a clip's K draws over several backward passes (memory at real shapes) sums the same
    linear contributions: features agree to float32 summation order; the losses are the same
    forwards run in smaller batches (another matmul blocking: the same float32 rounding bound)."""
    proj = _proj(wan, layers)
    batch = _clips(B, K, seed=5)
    n = _reduction_length(layers, K)
    feats, losses = kron_features(wan, proj, batch)
    feats_c, losses_c = kron_features(wan, proj, batch, draws_per_backward=per_backward)
    _assert_close_blocks(proj, feats_c, feats, n)
    torch.testing.assert_close(losses_c, losses, rtol=_tol(n), atol=0)


def test_per_draw_rows_average_to_the_k_draw_feature(wan, layers):
    """φ = Σ_k (w_k/K) φ_k: `per_draw_features` rows, weighted, give the `kron_features` feature."""
    proj = _proj(wan, layers)
    (clip,) = _clips(1, K, seed=8)
    rows, row_losses = per_draw_features(wan, proj, clip.latent, clip.context, clip.sigma, clip.eps)
    assert rows.shape == (K, proj.dim) and row_losses.shape == (K,)
    feat, losses = kron_features(wan, proj, [clip])

    combined = (clip.weights / K) @ rows  # (D,)
    # The per-draw path feeds K context rows instead of one broadcast row; its rows then go through
    # one more length-K contraction (the weighted sum), within the same n.
    _assert_close_blocks(proj, combined[None], feat, _reduction_length(layers, K))
    n_loss = math.prod(LATENT)
    torch.testing.assert_close(row_losses, losses[0], rtol=C * EPS32 * math.sqrt(n_loss), atol=0)

    # Each row is one draw's gradient alone: a single-draw clip with weight 1 gives the same row.
    for k in (0, K - 1):
        single = ClipDraws(
            clip.latent, clip.context, clip.sigma[k : k + 1], torch.ones(1), clip.eps[k : k + 1]
        )
        f_k, _ = kron_features(wan, proj, [single])
        _assert_close_blocks(proj, rows[k : k + 1], f_k, _reduction_length(layers, K))


def test_dense_features_restore_requires_grad_and_leave_no_grad(wan, layers):
    subset = layers[:3]  # gradients only where they are projected: the first three Linears
    frozen = [p for n, p in wan.named_parameters() if n.startswith("blocks.1.ffn")]
    assert frozen
    before = {n: p.requires_grad for n, p in wan.named_parameters()}
    try:
        for p in frozen:
            p.requires_grad_(False)  # a caller's own choice, which must survive the call
        flags = {n: p.requires_grad for n, p in wan.named_parameters()}
        batch = _clips(2, K, seed=9)
        proj = DenseProjector(subset, seed=0, dim=8)
        feats, losses = dense_features(wan, subset, proj, batch)
        assert feats.shape == (2, 8) and losses.shape == (2, K)
        assert torch.isfinite(feats).all() and feats.abs().sum() > 0
        assert {n: p.requires_grad for n, p in wan.named_parameters()} == flags
        assert [n for n, p in wan.named_parameters() if p.grad is not None] == []

        # An exception half-way (a bad clip) restores the flags and clears the grads too.
        bad = ClipDraws(batch[0].latent, batch[0].context, batch[0].sigma, batch[0].weights, batch[0].eps[:1])
        with pytest.raises(ValueError, match="expected z"):
            dense_features(wan, subset, proj, [batch[0], bad])
        assert {n: p.requires_grad for n, p in wan.named_parameters()} == flags
        assert [n for n, p in wan.named_parameters() if p.grad is not None] == []
    finally:
        for n, p in wan.named_parameters():
            p.requires_grad_(before[n])
            p.grad = None
