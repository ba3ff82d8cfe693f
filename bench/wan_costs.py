"""FLOP counts of Wan2.1-T2V-1.3B's stages from the real configs (meta tensors: nothing is computed).

The ratio ρ = c_enc / c_draw decides how much encoding once and reusing the encode for K draws can
save (bench/ecm.py: reuse factor K(ρ+1)/(ρ+K)). c_enc is one clip's VAE encode plus one UMT5-XXL
forward over its 512-token caption; c_draw is one draw's transformer forward + backward (the
attribution gradient). Counted with `torch.utils.flop_counter.FlopCounterMode` on meta tensors built
from the configs in ../shared/research/wan-diffusers.md (diffusers' AutoencoderKLWan defaults are the
Wan2.1 VAE). ρ as a FLOP ratio assumes both run at the same hardware efficiency: an estimate.

    .venv/bin/python bench/wan_costs.py     # ~1 min -> bench/results/wan_costs.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import UMT5Config, UMT5EncoderModel

OUT = Path(__file__).resolve().parent / "results" / "wan_costs.json"
TRANSFORMER_1_3B = dict(
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)  # fmt: skip
UMT5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)  # fmt: skip
SIZES = {"17x480x832": (17, 480, 832), "81x480x832": (81, 480, 832)}


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def main() -> None:
    t0 = time.monotonic()
    with torch.device("meta"):
        vae = AutoencoderKLWan()
        transformer = WanTransformer3DModel(**TRANSFORMER_1_3B)
        text = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        ids = torch.zeros(1, 512, dtype=torch.long)
    with torch.no_grad():
        umt5 = flops(lambda: text(input_ids=ids))
    out = {"umt5_forward_512_tokens_flop": umt5, "clip_sizes": {}}
    for name, (f, h, w) in SIZES.items():
        with torch.device("meta"):
            x = torch.empty(1, 3, f, h, w)
            z = torch.empty(1, 16, 1 + (f - 1) // 4, h // 8, w // 8)
            ctx = torch.empty(1, 512, 4096)
            t = torch.empty(1)
        with torch.no_grad():
            enc = flops(lambda x=x: vae.encode(x))

        def draw(z=z, ctx=ctx, t=t) -> None:
            v = transformer(hidden_states=z, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            v.pow(2).mean().backward()

        fwd_bwd = flops(draw)
        out["clip_sizes"][name] = {
            "latent": list(z.shape[1:]),
            "vae_encode_flop": enc,
            "transformer_fwd_bwd_flop": fwd_bwd,
            "rho": (enc + umt5) / fwd_bwd,
        }
        print(
            f"{name}: VAE {enc / 1e12:.1f} TFLOP, UMT5 {umt5 / 1e12:.1f}, draw {fwd_bwd / 1e12:.1f}, rho {(enc + umt5) / fwd_bwd:.3f}"
        )
    out["seconds"] = time.monotonic() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
