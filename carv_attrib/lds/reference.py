"""The fixed exact reference: unprojected gradients of the training loss, all trainable parameters.

LDS measures how well scores predict the effect of training data on a query's *training loss*
(`carv_attrib.lds.retrain.query_losses`). The reference attribution is therefore fixed, and
never follows featurize's options (output function, layers, projection, scheme):

    g_i = (1/K) Σ_k ∇θ ℓ(θ; z_i, c_i, σ_k, ε_k),   ℓ = mean((v_θ(x_σ, 1000σ, c) − (ε − z))²)   ("loss")
    σ_k ~ p(σ) iid (the model's training density), ε_k ~ N(0, I), K = 256 by default
    score(i, q) = g_iᵀ g_q      (grad-dot; TracIn at the final checkpoint)

with θ every trainable parameter of the transformer (embeddings, norms' affine terms, modulation
tables included), in `named_parameters` order. Two draw rules (`REFERENCE_DRAWS`):

- "crn": common random numbers, the same K draws for every clip and query (one shared stream);
- "per-clip": independent draws per clip (the clip's own stream), the textbook Monte Carlo.

Reference seeds are `REFERENCE_SEED + replicate`, disjoint from the estimator seeds (0, 1, ...), the
plan's pilot draws and the ground-truth draws, so an estimator never shares draws with its reference.

    rule = reference_rule("logit-normal:0,1", draws="crn", replicate=0)     # K = 256
    G = exact_gradients(transformer, clips, rule)                             # (n, P) float32
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import clip_objective
from carv_attrib.models.wan import pad_context
from carv_attrib.store.latents import CachedClip

REFERENCE_DRAWS = ("crn", "per-clip")
REFERENCE_K = 256
REFERENCE_SEED = 2_000_003
CHUNK_DRAWS = 64  # draws per forward of `exact_gradients` (bounds activation memory)


def reference_rule(density: str, k: int = REFERENCE_K, draws: str = "crn", replicate: int = 0) -> DrawRule:
    """The reference's draw rule: iid σ ~ `density`, seeded ε; `draws` "crn" (shared) or "per-clip"."""
    if draws not in REFERENCE_DRAWS:
        raise ValueError(f"unknown reference draw rule {draws!r}; use one of {', '.join(REFERENCE_DRAWS)}")
    noise = "shared" if draws == "crn" else "per-clip"
    return DrawRule(seed=REFERENCE_SEED + replicate, scheme="iid", k=k, density=density, noise=noise)


def trainable_parameters(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter of the transformer, in `named_parameters` order (the reference's θ)."""
    return list(transformer.named_parameters())


def exact_gradients(
    transformer: torch.nn.Module,
    clips: Sequence[CachedClip],
    rule: DrawRule,
    output_fn: str = "loss",
) -> np.ndarray:
    """(n, P) float32: each clip's full gradient ĝ = (1/K) Σ_k w_k ∇θ ℓ_k of its K draws under
    `rule` (the clip's stream: shared or per-clip), all P parameters of `trainable_parameters`
    flattened in order. `output_fn` "loss" is the reference; "sqnorm" gives the unprojected twin of
    a sqnorm setting. Draws run `CHUNK_DRAWS` per forward; parameters get requires_grad for the
    call and are restored after."""
    named = trainable_parameters(transformer)
    params = [p for _, p in named]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    rows = []
    try:
        for c in clips:
            sigma, w, eps = rule.draws_for(rule.stream_for(c.clip_id), tuple(c.latent.shape), device=device)
            ctx = pad_context(c.text_emb).to(device)  # (1, 512, D)
            z = c.latent.to(device)
            for p in params:
                p.grad = None
            k = sigma.shape[0]
            for s in range(0, k, CHUNK_DRAWS):
                sl = slice(s, s + CHUNK_DRAWS)
                # clip_objective averages over its own chunk: rescale so the chunks sum to the K-draw mean
                obj, _ = clip_objective(transformer, z, ctx, sigma[sl], eps[sl], w[sl], output_fn)
                (obj * (sigma[sl].shape[0] / k)).backward()
            rows.append(
                torch.cat(
                    [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                )
                .float()
                .cpu()
                .numpy()
            )
    finally:
        for p, r in zip(params, saved):
            p.grad = None
            p.requires_grad_(r)
    return np.stack(rows)
