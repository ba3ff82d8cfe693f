"""Tiny models, fixed K-draw data and the flow-matching loss shared by the attrib tests.

Every example carries its own fixed draws (ε (K, ...), σ (K,), w (K,)), so its loss

    ℓ = (1/K) Σ_k w_k · mean((v_θ((1−σ_k) z + σ_k ε_k, 1000 σ_k, c) − (ε_k − z))²)

is deterministic and the same function can be handed to our hooks, to torch.func and to the
external oracles (traker, dattri).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LATENT = (16, 2, 4, 4)  # (C, T, H, W) of the tiny Wan transformer input
CTX_LEN, CTX_DIM = 5, 32


def tiny_wan() -> nn.Module:
    """The tiny WanTransformer3DModel (28k parameters) of `make-model --size tiny`, eval mode, seeded."""
    from carv_attrib.models.tiny import build_transformer

    return build_transformer("tiny", seed=0)


def make_data(n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """n examples with K fixed draws each: z (n, C, T, H, W), eps (n, K, C, T, H, W), sigma (n, K),
    w (n, K) importance weights, ctx (n, L, D) text context."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "z": torch.randn(n, *LATENT, generator=gen),
        "eps": torch.randn(n, k, *LATENT, generator=gen),
        "sigma": torch.rand(n, k, generator=gen) * 0.9 + 0.05,
        "w": torch.rand(n, k, generator=gen) + 0.5,
        "ctx": torch.randn(n, CTX_LEN, CTX_DIM, generator=gen),
    }


def wan_call(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, t, c: model(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]


def flow_losses(
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    w: torch.Tensor,
    ctx: torch.Tensor,
) -> torch.Tensor:
    """Per-example weighted K-draw flow-matching losses (B,) from ONE forward over B·K rows.

    z (B, C, T, H, W), eps (B, K, C, T, H, W), sigma/w (B, K), ctx (B, L, D) one context per
    example, or (1, L, D) broadcast over all rows (then B must be 1).
    """
    b, k = sigma.shape
    z_rows = z.repeat_interleave(k, dim=0)  # (B·K, C, T, H, W)
    e_rows = eps.reshape(b * k, *z.shape[1:])  # (B·K, C, T, H, W)
    s = sigma.reshape(b * k, *([1] * (z.dim() - 1)))  # (B·K, 1, 1, 1, 1)
    x = (1 - s) * z_rows + s * e_rows
    c = ctx if ctx.shape[0] == 1 else ctx.repeat_interleave(k, dim=0)  # (B·K | 1, L, D)
    v = call(x, 1000 * sigma.reshape(-1), c)  # (B·K, C, T, H, W)
    per_row = ((v - (e_rows - z_rows)) ** 2).reshape(b * k, -1).mean(dim=1)  # (B·K,)
    return (w.reshape(-1) * per_row).reshape(b, k).mean(dim=1)  # (B,)


def example(data: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, ...]:
    """Example i as a batch of one: (z, eps, sigma, w, ctx) with ctx (1, L, D)."""
    return tuple(data[key][i : i + 1] for key in ("z", "eps", "sigma", "w", "ctx"))


def per_example_flat_grads(model: nn.Module, layers, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, p) flattened [∇W | ∇b] of the selected layers, plain autograd, one example at a time."""
    from carv_attrib.attrib.gradients import flat_grad

    rows = []
    for i in range(data["z"].shape[0]):
        model.zero_grad(set_to_none=True)
        flow_losses(wan_call(model), *example(data, i)).sum().backward()
        rows.append(flat_grad(layers))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def param_order_to_ours(grads: dict[str, torch.Tensor], layers) -> torch.Tensor:
    """(B, p) in our [W | b] row-major layout from per-parameter batched grads {name: (B, ...)}."""
    parts = []
    for name, layer in layers:
        gw = grads[f"{name}.weight"]  # (B, out, in)
        cols = [gw.reshape(gw.shape[0], layer.out_features, layer.in_features)]
        if layer.bias is not None:
            cols.append(grads[f"{name}.bias"].reshape(gw.shape[0], -1, 1))  # (B, out, 1)
        parts.append(torch.cat(cols, dim=2).reshape(gw.shape[0], -1))
    return torch.cat(parts, dim=1)


def split_flat_param_order(flat: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """{param name: (B, ...)} from (B, p) laid out weight, bias, weight, bias, ... in layer order."""
    out, start = {}, 0
    for name, layer in layers:
        for pname, param in (("weight", layer.weight), ("bias", layer.bias)):
            if param is None:
                continue
            out[f"{name}.{pname}"] = flat[:, start : start + param.numel()]
            start += param.numel()
    assert start == flat.shape[1], (start, flat.shape)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())
