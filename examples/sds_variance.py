"""The CARV estimator outside attribution: the variance of a score-distillation (SDS) gradient.

Score distillation (DreamFusion's SDS; for flow models the velocity form) optimises a render x = R(θ)
so that a frozen diffusion model finds it likely. Its gradient with respect to the render's latent z is
an expectation over timesteps σ and noise ε, exactly like the attribution signal:

    g(z) = E_{σ~p, ε~N(0,I)} [ v̂(x_σ, σ) − (ε − z) ],   x_σ = (1−σ) z + σ ε       (no U-Net Jacobian)

Each evaluation needs a render + VAE encode (c_enc) and then one transformer forward per draw (c_draw).
`carv_attrib.carv` is model-agnostic: one encode is reused for K draws with stratified inverse-CDF
importance-sampled σ (`DrawRule`), which leaves E[g] unchanged. This script estimates g for a tiny
Wan2.1 pipeline (the real diffusers classes, random weights) and a clip rendered from a "scene"
(`carv_attrib.lds.synthetic`), and prints each scheme's variance and effective compute multiplier (ECM)
against the baseline "fresh render + encode per draw, iid σ, K = 1", with the same batching on both
sides (one forward over the K draws of an encode):

    ECM(K) = Var_base · c_base / (Var_K · c_K),   c_base = c_enc + c_draw,   c_K = c_enc + K·c_draw

where Var is the total variance (sum over latent entries) of the estimated gradient, over --replicates
independent seeds. Usage (about 30 s on 2 cores):

    .venv/bin/python examples/sds_variance.py --k 8 --replicates 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import TIMESTEP_SCALE
from carv_attrib.lds.synthetic import ClipSpec, render_frames
from carv_attrib.models.tiny import make_model
from carv_attrib.models.wan import encode_prompts, encode_video, load_wan, pad_context


def sds_gradient(transformer, z: torch.Tensor, ctx: torch.Tensor, rule: DrawRule) -> torch.Tensor:
    """(C, T, H, W): Σ_k (w_k/K) [v̂(x_σk, σ_k) − (ε_k − z)] for the K draws of `rule` (one forward)."""
    sigma, w, eps = rule.draws_for(rule.stream_for(), tuple(z.shape))  # (K,), (K,), (K, C, T, H, W)
    s = sigma.float().view(-1, 1, 1, 1, 1)
    x = (1 - s) * z + s * eps  # (K, C, T, H, W)
    with torch.no_grad():
        v = transformer(
            hidden_states=x,
            timestep=sigma.float() * TIMESTEP_SCALE,
            encoder_hidden_states=ctx,
            return_dict=False,
        )[0]
    resid = v - (eps - z)  # (K, C, T, H, W)
    return (w.float().view(-1, 1, 1, 1, 1) * resid).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Wan2.1 diffusers dir (default: a tiny one built in a temp dir)")
    ap.add_argument("--k", type=int, default=8, help="draws per encode")
    ap.add_argument("--replicates", type=int, default=16, help="independent seeds per scheme")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(Path(tmp) / "tiny-wan")
        if args.model is None:
            make_model(model, size="tiny", seed=0)
        wan = load_wan(model, ("vae", "text_encoder", "tokenizer", "transformer"), device="cpu")
    spec = ClipSpec("scene", "red", "square", "left", "grey", size=6, start=(20, 16))
    frames = render_frames(spec, args.frames, args.size, args.size, speed=1.0)  # the "render" R(θ)
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F, H, W)
    ctx = pad_context(encode_prompts(wan, [spec.caption])[0])  # (1, 512, D)

    def encode() -> torch.Tensor:
        return encode_video(wan.vae, x)[0]  # (C, T, h, w); deterministic (posterior mode)

    z = encode()
    t0 = time.monotonic()
    for _ in range(3):
        encode()
    c_enc = (time.monotonic() - t0) / 3

    def measure(scheme: str, k: int, fresh_encode: bool) -> tuple[float, float]:
        """(total variance of the estimate over replicates, seconds per estimate)."""
        grads, secs = [], []
        for r in range(args.replicates):
            rule = DrawRule(seed=1000 + r, scheme=scheme, k=k)
            t = time.monotonic()
            zz = encode() if fresh_encode else z
            grads.append(sds_gradient(wan.transformer, zz, ctx, rule))
            secs.append(time.monotonic() - t)
        g = torch.stack(grads)  # (R, C, T, H, W)
        return float(g.var(0, unbiased=True).sum()), statistics.median(secs)

    var_base, sec_base = measure("iid", 1, fresh_encode=True)
    _, sec_draw_only = measure("iid", 1, fresh_encode=False)
    c_draw = max(sec_draw_only, 1e-9)
    print(
        f"c_enc {c_enc * 1e3:.1f} ms, c_draw {c_draw * 1e3:.1f} ms (rho = c_enc/c_draw = {c_enc / c_draw:.2f})"
    )
    print(f"baseline iid K=1 with a fresh encode per draw: total variance {var_base:.4g}")
    print("| scheme | K | total variance | Var_base / Var | ECM (cost-adjusted) |")
    print("|---|---|---|---|---|")
    c_base = c_enc + c_draw
    for scheme in ("iid", "stratified", "stratified-is"):
        var, _ = measure(scheme, args.k, fresh_encode=False)
        c_k = c_enc + args.k * c_draw
        print(
            f"| {scheme} | {args.k} | {var:.4g} | {var_base / var:.2f} | {var_base * c_base / (var * c_k):.2f} |"
        )


if __name__ == "__main__":
    main()
