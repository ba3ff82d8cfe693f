"""B clips x K draws → one projected-gradient feature per clip.

The clip's feature is φ = P ĝ with ĝ = (1/K) Σ_k w_k ∇θ ℓ(σ_k, ε_k) (the CARV estimator of
g = E[∇θ ℓ]); the weights w_k/K are folded into the per-draw losses by `clip_objective`, so the
gradient of the summed objective is ĝ itself.

- `kron`: one backward over all B clips; hooks split it per clip and project layer by layer
  (`KronProjector`), parameter gradients off, the full gradient never exists.
- `dense`: the reference; one backward per clip with parameter gradients on, the flattened
  gradient of the selected layers times a chunk-generated JL matrix (`DenseProjector`).

    feats, losses = projector.batch_features(transformer, batch)   # (B, D), (B, K)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from carv_attrib.carv.objective import clip_objective


class HookProjector(Protocol):
    """What `kron_features` and `per_draw_features` need of a projector (`KronProjector`): inside
    `capture`, hooks file each forward's per-sample gradient under `slot` (an int, or one slot id
    per input row) and project it; `features()` is then (num_slots, D)."""

    slot: int | Tensor | None

    def capture(self, num_slots: int) -> AbstractContextManager[Any]: ...

    def features(self) -> Tensor: ...


class MatrixProjector(Protocol):
    """What `dense_features` needs of a projector (`DenseProjector`): flattened gradients (B, p)
    times its (p, D) matrix."""

    def project(self, g: Tensor) -> Tensor: ...


@dataclass
class ClipDraws:
    """One clip's inputs: latent z (C, T, H, W), context (1, L, D) and its K draws."""

    latent: Tensor
    context: Tensor
    sigma: Tensor  # (K,)
    weights: Tensor  # (K,)
    eps: Tensor  # (K, C, T, H, W)
    token_weight: Tensor | None = None  # (T, H, W) per-token loss weights (motion objective)


def flat_grad(layers: Sequence[tuple[str, nn.Linear]]) -> torch.Tensor:
    """(p,) float32: each layer's [∇W | ∇b] flattened row-major, concatenated in layer order.

    A layer whose `.grad` is None (it took no part in the loss) contributes zeros.
    """
    parts = []
    for _, layer in layers:
        w = layer.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)  # (out, in)
        cols = [gw.float()]
        if layer.bias is not None:
            b = layer.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)  # (out,)
            cols.append(gb.float()[:, None])
        parts.append(torch.cat(cols, dim=1).reshape(-1))  # (out · in_aug,)
    return torch.cat(parts)


def kron_features(
    transformer: nn.Module,
    projector: HookProjector,
    batch: Sequence[ClipDraws],
    output_fn: str = "loss",
    draws_per_backward: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(features (B, D) float32 CPU, per-draw losses (B, K)) with one backward over B×K draws, or,
    with `draws_per_backward` = c, one backward per c draws of a clip: the activations held at once
    are c draws' instead of B·K (at Wan2.1-1.3B's 17x480x832 one draw holds ~36 GB in float32,
    bench/real_shapes.py). The objective is linear in the draws, so the accumulated φ is the same
    up to the order of float32 additions: chunk j contributes (k_j/K)·L_j with L_j its own
    Σ (w_k/k_j) ℓ_k (`clip_objective`)."""
    losses = []
    with projector.capture(num_slots=len(batch)):
        total: Tensor | None = None
        for b, clip in enumerate(batch):
            projector.slot = b  # the hooks file this forward's activations under clip b
            k = clip.sigma.shape[0]
            if draws_per_backward is None or draws_per_backward >= k:
                obj, ell = clip_objective(
                    transformer, clip.latent, clip.context, clip.sigma, clip.eps, clip.weights, output_fn,
                    clip.token_weight,
                )  # fmt: skip
                total = obj if total is None else total + obj
                losses.append(ell.float().cpu())
                continue
            parts = []
            for lo in range(0, k, draws_per_backward):
                hi = min(k, lo + draws_per_backward)
                obj, ell = clip_objective(
                    transformer, clip.latent, clip.context, clip.sigma[lo:hi], clip.eps[lo:hi],
                    clip.weights[lo:hi], output_fn, clip.token_weight,
                )  # fmt: skip
                (obj * ((hi - lo) / k)).backward()
                parts.append(ell.float().cpu())
            losses.append(torch.cat(parts))
        if total is not None:
            total.backward()
    return projector.features(), torch.stack(losses)


def dense_features(
    transformer: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    projector: MatrixProjector,
    batch: Sequence[ClipDraws],
    output_fn: str = "loss",
) -> tuple[Tensor, Tensor]:
    """Reference path: per-clip backward, flattened gradient of `layers`, dense projection."""
    selected = {id(p) for _, m in layers for p in m.parameters()}
    saved = [(p, p.requires_grad) for p in transformer.parameters()]
    grads, losses = [], []
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in selected)  # gradients only where they are projected
            p.grad = None
        for clip in batch:
            obj, ell = clip_objective(
                transformer, clip.latent, clip.context, clip.sigma, clip.eps, clip.weights, output_fn,
                clip.token_weight,
            )  # fmt: skip
            obj.backward()
            grads.append(flat_grad(layers))  # (p,)
            losses.append(ell.float().cpu())
            for _, m in layers:
                for p in m.parameters():
                    p.grad = None
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
    feats = projector.project(torch.stack(grads))  # (B, p) -> (B, D): one pass over the matrix
    return feats.float().cpu(), torch.stack(losses)


def per_draw_features(
    transformer: nn.Module,
    projector: HookProjector,
    latent: Tensor,
    context: Tensor,
    sigma: Tensor,
    eps: Tensor,
    output_fn: str = "loss",
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One feature per draw, φ_k = P ∇θ ℓ(σ_k, ε_k): (K, D) and losses (K,), for pilots (`plan`).

    The context is expanded to K rows here (not broadcast), so that every layer, the
    cross-attention K/V projections included, sees one input row per draw and the hooks can
    separate the draws. Weights K make Σ_k (w_k/K) ℓ_k = Σ_k ℓ_k, whose per-row gradient is ∇ℓ_k.
    """
    K = sigma.shape[0]
    with projector.capture(num_slots=K):
        projector.slot = torch.arange(K)
        ctx = context.expand(K, -1, -1).contiguous()  # (K, L, D)
        obj, ell = clip_objective(
            transformer, latent, ctx, sigma, eps, torch.full((K,), float(K)), output_fn, token_weight
        )
        obj.backward()
    return projector.features(), ell.float().cpu()
