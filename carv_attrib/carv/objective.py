"""The Wan2.1 flow-matching objective over K (σ, ε) draws of one cached latent.

Rectified flow with v-prediction (ARCHITECTURE §2; research note wan-diffusers §3):

    x_σ = (1−σ)·z + σ·ε,   model timestep t = 1000·σ (a float, not rounded),   target v* = ε − z
    "loss":    ℓ_k = mean((v_θ(x_σk, t_k, c) − (ε_k − z))²)
    "sqnorm":  ℓ_k = mean(v_θ(x_σk, t_k, c)²)                 (D-TRAK's output function)

With a per-token weight m (T, H, W) of mean 1 (motion attribution, Motive arXiv 2601.08828: a
loss-space motion mask; `carv_attrib.carv.weights.motion_weights`) the mean becomes a weighted one,
ℓ_k = mean(m · r_k²) over (C, T, H, W) with m broadcast over channels, so moving tokens dominate
the gradient; m = 1 is the plain objective.

`clip_objective` returns L = Σ_k (w_k/K)·ℓ_k, whose gradient is the weighted K-draw estimate
ĝ = (1/K) Σ_k w_k ∇θ ℓ_k: the weights are folded into the per-draw losses so one backward gives ĝ.
Losses are reduced in float32 (float64 for a float64 model) even when the model runs in bf16.

Usage:

    >>> sigma, w, eps = rule.draws_for(stream, z.shape, device=z.device)
    >>> obj, per_draw = clip_objective(transformer, z, context, sigma, eps, w)   # z (C,T,H,W)
    >>> obj.backward()   # parameter .grad (or hooks) now hold the clip's ĝ
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from carv_attrib.choices import OUTPUT_FNS

TIMESTEP_SCALE = 1000.0  # Wan2.1's num_train_timesteps: t = 1000·σ
TIMESTEP_CONVENTION = "t = 1000*sigma (float)"

# The output function's residual r_k, whose square's mean is ℓ_k: v (the model's output), eps, z.
RESIDUALS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "loss": lambda v, eps, z: v - (eps - z),  # flow-matching error against v* = ε − z
    "sqnorm": lambda v, eps, z: v,  # D-TRAK: the output itself
}
assert tuple(RESIDUALS) == OUTPUT_FNS, "choices.OUTPUT_FNS and RESIDUALS must agree"


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of a model (diffusers' `.dtype` skips fp32-kept modules)."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        floating = [p.dtype for p in params if p.is_floating_point()]
        dtype = floating[0] if floating else torch.float32
    return dtype, device


def clip_objective(
    transformer: nn.Module,
    z: Tensor,
    context: Tensor,
    sigma: Tensor,
    eps: Tensor,
    weights: Tensor,
    output_fn: str = "loss",
    token_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One forward over the K draws of one clip: (L = Σ_k (w_k/K)·ℓ_k scalar, ℓ detached (K,)).

    z (C, T, H, W) is the clip's normalised latent, context (1, L, D) its text embedding (passed with
    batch 1: the transformer broadcasts it over the K draws, which is cheaper than expanding it),
    sigma (K,), eps (K, C, T, H, W), weights (K,); token_weight (T, H, W) optional per-token loss
    weights (mean 1; None: all 1). Any module with WanTransformer3DModel's call signature works.
    """
    residual = RESIDUALS.get(output_fn)
    if residual is None:
        raise ValueError(f"unknown output function {output_fn!r}; expected one of {', '.join(OUTPUT_FNS)}")
    dtype, device = _model_dtype_device(transformer)
    acc = torch.promote_types(dtype, torch.float32)  # reduce losses in at least fp32
    K = sigma.shape[0]
    if z.dim() != 4 or eps.shape != (K, *z.shape) or weights.shape != (K,):
        raise ValueError(
            f"expected z (C,T,H,W), eps (K,C,T,H,W), sigma and weights (K,); got z {tuple(z.shape)}, "
            f"eps {tuple(eps.shape)}, sigma {tuple(sigma.shape)}, weights {tuple(weights.shape)}"
        )
    if context.dim() == 2:
        context = context[None]  # (L, D) -> (1, L, D)

    z = z.to(device=device, dtype=acc)[None]  # (1, C, T, H, W)
    eps = eps.to(device=device, dtype=acc)  # (K, C, T, H, W)
    s = sigma.to(dtype=acc).to(device).view(K, 1, 1, 1, 1)  # (K, 1, 1, 1, 1)
    x = (1 - s) * z + s * eps  # (K, C, T, H, W) x_σ, mixed in fp32 then cast for the model
    # The timestep embedding is sinusoidal in fp32 whatever the model dtype, so t is passed as fp32/fp64.
    t = (sigma.to(dtype=acc) * TIMESTEP_SCALE).to(device)  # (K,)
    v = transformer(
        hidden_states=x.to(dtype),
        timestep=t,
        encoder_hidden_states=context.to(device=device, dtype=dtype),
        return_dict=False,
    )[0]  # (K, C, T, H, W)
    if v.shape != x.shape:
        raise ValueError(
            f"model output {tuple(v.shape)} differs from its input {tuple(x.shape)}: latent H and W must "
            "be multiples of the transformer's patch size"
        )
    v = v.to(acc)
    resid = residual(v, eps, z)  # (K, C, T, H, W)
    sq = resid.pow(2)
    if token_weight is not None:
        if token_weight.shape != z.shape[2:]:
            raise ValueError(
                f"token weights {tuple(token_weight.shape)} do not match the latent grid {tuple(z.shape[2:])}"
            )
        sq = sq * token_weight.to(device=device, dtype=acc)[None, None]  # (K, C, T, H, W)
    per_draw = sq.flatten(1).mean(1)  # (K,) ℓ_k
    w = weights.to(dtype=acc).to(device)  # (K,)
    objective = (w * per_draw).sum() / K
    return objective, per_draw.detach()


def batch_objective(
    transformer: nn.Module,
    zs: Tensor,
    contexts: Tensor | Sequence[Tensor],
    sigma: Tensor,
    eps: Tensor,
    weights: Tensor,
    output_fn: str = "loss",
) -> tuple[Tensor, Tensor]:
    """Σ_b clip_objective(clip b) over B clips and per-draw losses (B, K).

    zs (B, C, T, H, W); contexts a list of (1, L_b, D) (captions of different lengths) or a (B, L, D)
    tensor; sigma (B, K), eps (B, K, C, T, H, W), weights (B, K) — or sigma/weights (K,) and eps
    (K, C, T, H, W) shared by all clips (the shared noise stream). Each clip gets its own forward with
    batch K, so its context is passed once and broadcast; one backward of the sum then yields the sum
    of per-clip gradients, which gradient hooks split per clip.
    """
    B = zs.shape[0]
    if len(contexts) != B:
        raise ValueError(f"{B} latents but {len(contexts)} contexts")
    total, per_draw = None, []
    for b in range(B):
        sig_b = sigma if sigma.dim() == 1 else sigma[b]  # (K,)
        w_b = weights if weights.dim() == 1 else weights[b]  # (K,)
        eps_b = eps if eps.dim() == zs.dim() else eps[b]  # (K, C, T, H, W)
        ctx_b = contexts[b] if not isinstance(contexts, Tensor) else contexts[b : b + 1]  # (1, L_b, D)
        obj, ell = clip_objective(transformer, zs[b], ctx_b, sig_b, eps_b, w_b, output_fn)
        total = obj if total is None else total + obj
        per_draw.append(ell)
    if total is None:
        raise ValueError("batch_objective needs at least one clip")
    return total, torch.stack(per_draw)  # scalar, (B, K)
