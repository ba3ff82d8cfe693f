"""The K-draw flow-matching objective on a tiny WanTransformer3DModel.

(a) one backward of the batched objective is exactly the weighted sum of single-draw gradients;
(b) over many replicates, stratified-is and iid estimate the same expected gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from carv_attrib.carv import rng
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import TIMESTEP_SCALE, batch_objective, clip_objective
from carv_attrib.carv.timesteps import Proposal, density

LATENT = (16, 2, 4, 4)  # (C, T, H, W): 8 tokens after the (1, 2, 2) patch
K = 4


@pytest.fixture(scope="module")
def model64(tiny_transformer) -> torch.nn.Module:
    """A float64 copy, so that gradient identities hold to ~1e-12 rather than fp32 rounding."""
    return copy.deepcopy(tiny_transformer).to(torch.float64)


def inputs(seed: int, dtype: torch.dtype, ctx_len: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(LATENT, generator=g, dtype=dtype)  # (C, T, H, W)
    context = torch.randn(1, ctx_len, 32, generator=g, dtype=dtype)  # (1, L, D)
    return z, context


def grads(model: torch.nn.Module, objective: torch.Tensor, params=None) -> torch.Tensor:
    """The flattened gradient of `objective` w.r.t. `params` (default: all parameters)."""
    params = list(model.parameters()) if params is None else params
    return torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_objective_values_and_context_broadcast(model64) -> None:
    z, context = inputs(0, torch.float64)
    sigma, w, eps = DrawRule(seed=1, k=K, scheme="iid").draws_for(0, LATENT, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    obj, per_draw = clip_objective(model64, z, context, sigma, eps, w)
    # The same forward written out, with the context expanded to the K draws.
    x = (1 - sigma.view(K, 1, 1, 1, 1)) * z + sigma.view(K, 1, 1, 1, 1) * eps
    v = model64(
        hidden_states=x,
        timestep=sigma * TIMESTEP_SCALE,
        encoder_hidden_states=context.expand(K, -1, -1),
        return_dict=False,
    )[0]
    manual = ((v - (eps - z)) ** 2).flatten(1).mean(1).detach()  # (K,)
    assert torch.allclose(per_draw, manual, rtol=1e-10, atol=0)
    assert float(obj.detach()) == pytest.approx(float((w * manual).sum() / K), rel=1e-12)
    assert not per_draw.requires_grad and obj.requires_grad

    _, sq = clip_objective(model64, z, context, sigma, eps, w, output_fn="sqnorm")
    assert torch.allclose(sq, (v**2).flatten(1).mean(1), rtol=1e-10, atol=0)

    with pytest.raises(ValueError, match="output function"):
        clip_objective(model64, z, context, sigma, eps, w, output_fn="l1")
    with pytest.raises(ValueError, match="expected z"):
        clip_objective(model64, z, context, sigma, eps[:2], w)
    odd = torch.zeros(16, 2, 5, 5, dtype=torch.float64)  # H, W not multiples of the patch size
    with pytest.raises(ValueError, match="patch size"):
        clip_objective(model64, odd, context, sigma, torch.zeros(K, *odd.shape, dtype=torch.float64), w)


def test_float32_loss_for_bf16_model(tiny_transformer) -> None:
    model = copy.deepcopy(tiny_transformer).to(torch.bfloat16)
    z, context = inputs(0, torch.float32)
    sigma, w, eps = DrawRule(seed=1, k=K).draws_for(0, LATENT)
    obj, per_draw = clip_objective(model, z, context, sigma, eps, w)
    assert obj.dtype == per_draw.dtype == torch.float32 and bool(torch.isfinite(per_draw).all())


def test_batched_gradient_equals_sum_of_single_draws(model64) -> None:
    """∇ Σ_k (w_k/K) ℓ_k from one forward/backward over K draws = Σ_k (w_k/K) ∇ℓ_k one draw at a time."""
    q = Proposal.from_bins(torch.linspace(0, 1, 5), [4.0, 1.0, 1.0, 2.0], "logit-normal:0,1", 0.1)
    rule = DrawRule(seed=3, k=K, density="logit-normal:0,1", proposal=q)
    z, context = inputs(1, torch.float64)
    sigma, w, eps = rule.draws_for(0, LATENT, dtype=torch.float64)
    assert not torch.equal(w, torch.ones_like(w))
    batched = grads(model64, clip_objective(model64, z, context, sigma, eps, w)[0])
    single = sum(
        (w[k] / K)
        * grads(model64, clip_objective(model64, z, context, sigma[[k]], eps[[k]], torch.ones(1))[0])
        for k in range(K)
    )
    err = rel_err(batched, single)
    print(f"clip_objective: batched vs single-draw gradient, relative error {err:.2e}")
    assert err < 1e-5

    # B = 2 clips with different caption lengths: one backward = the sum of per-clip gradients.
    z2, context2 = inputs(2, torch.float64, ctx_len=5)
    s2, w2, e2 = rule.draws_for(rng.clip_stream(7), LATENT, dtype=torch.float64)
    total, per_draw = batch_objective(
        model64,
        torch.stack([z, z2]),
        [context, context2],
        torch.stack([sigma, s2]),
        torch.stack([eps, e2]),
        torch.stack([w, w2]),
    )
    assert per_draw.shape == (2, K)
    per_clip = grads(model64, clip_objective(model64, z, context, sigma, eps, w)[0]) + grads(
        model64, clip_objective(model64, z2, context2, s2, e2, w2)[0]
    )
    err = rel_err(grads(model64, total), per_clip)
    print(f"batch_objective: B=2 vs sum of per-clip gradients, relative error {err:.2e}")
    assert err < 1e-5

    # Shared draws given once as (K,) / (K, C, T, H, W) equal the same draws given per clip.
    contexts = torch.cat([context, context])  # (B, L, D)
    shared, _ = batch_objective(model64, torch.stack([z, z2]), contexts, sigma, eps, w)
    expanded, _ = batch_objective(
        model64, torch.stack([z, z2]), contexts, sigma.expand(2, K), eps.expand(2, *eps.shape), w.expand(2, K)
    )
    assert rel_err(grads(model64, shared), grads(model64, expanded)) < 1e-12


def per_sample_grads(model, z, context, sigma, eps, w, layers: list[str]) -> torch.Tensor:
    """(N, D) per-draw gradients ∇θ(w_n·ℓ_n) of the `layers` (nn.Linear weights), from ONE forward.

    The N draws go through `clip_objective` as one batch; for a Linear, the per-sample weight gradient
    is Σ_tokens δ_t x_tᵀ (δ: gradient at the layer output, x: its input), captured with hooks.
    """
    n = sigma.shape[0]
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fwd(module, args, out):
            x = args[0].detach()

            def bwd(delta):
                # (N, [tokens,] out) x (N, [tokens,] in) -> (N, out, in); ×N undoes clip_objective's 1/N.
                captured[name] = n * torch.einsum("n...o,n...i->noi", delta, x).flatten(1)

            out.register_hook(bwd)

        return fwd

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        obj, _ = clip_objective(model, z, context, sigma, eps, w)
        torch.autograd.grad(obj, [modules[name].weight for name in layers])
    finally:
        for h in handles:
            h.remove()
    return torch.cat([captured[name] for name in layers], dim=1)  # (N, D)


@pytest.mark.slow
def test_stratified_is_and_iid_estimate_the_same_gradient(tiny_transformer) -> None:
    """Two-sample z on 8 random projections of the gradient over 1000 replicates each: |z| < 4.

    A negative control shows the comparison has power: the same draws without the weights w = p/q
    (a biased estimator) must be caught.
    """
    model = tiny_transformer
    layers = ["condition_embedder.time_embedder.linear_1", "blocks.1.attn1.to_q", "proj_out"]
    weights = [dict(model.named_modules())[name].weight for name in layers]
    dim = sum(p.numel() for p in weights)
    proj = torch.randn(dim, 8, generator=torch.Generator().manual_seed(5))  # (D, 8)
    spec = "logit-normal:0,1"
    z, context = inputs(3, torch.float32)
    n_rep = 1000

    # The per-sample harness against plain autograd on a few draws.
    sigma, w, eps = DrawRule(seed=9, k=3, density=spec).draws_for(0, LATENT)
    hooked = per_sample_grads(model, z, context, sigma, eps, w, layers)  # (3, D)
    for k in range(3):
        direct = grads(model, clip_objective(model, z, context, sigma[[k]], eps[[k]], w[[k]])[0], weights)
        assert rel_err(hooked[k], direct) < 1e-4

    # Pilot: q* ∝ p̄_bin · sqrt(mean ‖g‖²) on 8 σ bins, 8 draws per bin (ARCHITECTURE §2).
    edges = torch.linspace(0, 1, 9, dtype=torch.float64)
    p = density(spec)
    p_bar = (p.cdf(edges[1:]) - p.cdf(edges[:-1])) / (edges[1:] - edges[:-1])
    u = rng.uniforms(10**6, 0, range(64)).view(8, 8)  # (bins, draws)
    pilot_sigma = (edges[:-1, None] + u * (edges[1:] - edges[:-1])[:, None]).flatten()  # (64,)
    pilot_eps = rng.noise(10**6, 0, range(64), LATENT)
    g = per_sample_grads(model, z, context, pilot_sigma, pilot_eps, torch.ones(64), layers)  # (64, D)
    scores = p_bar * g.double().square().sum(1).view(8, 8).mean(1).sqrt()

    def replicates(rule: DrawRule, unweighted: bool = False) -> torch.Tensor:
        """(n_rep, 8): the projected K-draw estimate ĝ·P of replicates with seeds 0..n_rep−1."""
        per_rep = [dataclasses.replace(rule, seed=r).draws_for(0, LATENT) for r in range(n_rep)]
        sigma, w, eps = (torch.cat(t) for t in zip(*per_rep, strict=True))  # (n_rep·K, ...)
        w = torch.ones_like(w) if unweighted else w
        g = per_sample_grads(model, z, context, sigma, eps, w, layers)  # (n_rep·K, D)
        return (g.view(n_rep, K, -1).mean(1) @ proj).double()  # ĝ_r = (1/K) Σ_k w_k ∇ℓ_k

    est = {
        "iid": replicates(DrawRule(scheme="iid", k=K, density=spec)),
        "stratified": replicates(DrawRule(scheme="stratified", k=K, density=spec)),
    }
    for form in ("flat", "p-scaled"):
        q = Proposal.from_bins(edges, scores, spec, 0.1, form=form)
        est[f"stratified-is ({form})"] = replicates(
            DrawRule(scheme="stratified-is", k=K, density=spec, proposal=q)
        )

    ramp = Proposal.from_bins(edges, torch.arange(1.0, 9.0), spec, 0.1)  # mass shifted towards σ = 1
    control = replicates(DrawRule(scheme="stratified-is", k=K, density=spec, proposal=ramp), unweighted=True)

    def z_scores(e: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(8,) two-sample z = (mean_a − mean_b) / sqrt(se_a² + se_b²)."""
        return (e.mean(0) - base.mean(0)) / (e.var(0) / e.shape[0] + base.var(0) / base.shape[0]).sqrt()

    base = est["iid"]
    lines, worst = [], 0.0
    for name, e in est.items():
        if name == "iid":
            continue
        z = z_scores(e, base)
        worst = max(worst, float(z.abs().max()))
        ratio = (e.var(0) / base.var(0)).median()
        lines.append(
            f"{name} vs iid: z in [{float(z.min()):.2f}, {float(z.max()):.2f}], "
            f"median Var ratio {float(ratio):.3f}"
        )
    z_control = z_scores(control, base)
    lines.append(
        f"negative control (stratified-is without weights) vs iid: max |z| {float(z_control.abs().max()):.2f}"
    )
    report = "\n".join(lines)
    print("\n" + report)
    assert math.isfinite(worst) and worst < 4, report
    assert float(z_control.abs().max()) > 4, report
