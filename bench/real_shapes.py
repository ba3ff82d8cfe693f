"""Wan2.1-T2V-1.3B at its real shapes (random weights, real configs): what one attribution draw costs.

Measured here, each case in a fresh subprocess (so each peak-memory figure is its own):
  transformer  the 1.3B transformer from its real config (30 blocks, 300 nn.Linear, text_dim 4096,
               so the 512 x 4096 UMT5 context is a stand-in tensor of the real shape), one clip x K
               draws at a reduced latent, forward + backward:
                 kron   `KronProjector` hooks on all 300 Linear layers at 16 x 16 (the default feature),
                 plain  the same forwards and one backward with no hooks and no parameter gradients
                        (latent and context require grad: the floor kron builds on),
               in float32 and in bfloat16 (kron accumulates in float32 either way);
  vae          the Wan2.1 VAE (diffusers' AutoencoderKLWan defaults) encoding a reduced clip, with
               and without tiling (tiles forced small so that they take effect at the reduced size).
Peak memory is the process's peak RSS on CPU (torch.cuda.max_memory_allocated on CUDA); times are the
median of --repeats calls after one warm-up.

Scaled: times by FLOPs (FlopCounterMode on meta tensors at the reduced and the real latent) to clips of
17 and 81 frames at 480 x 832; transformer activation memory linearly in tokens from two reduced
latents; clips per GPU-hour on an H100 from the FLOP counts, the GPU's stated dense bf16 peak and a
stated utilisation: an ESTIMATE, marked as such in the JSON. `bench/gpu_check.sh` measures the same
on a GPU machine at the real sizes.

    .venv/bin/python bench/real_shapes.py          # ~15 min on 2 cores -> bench/results/real_shapes.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402
from featurize_speed import make_batch, plain_forward_backward  # noqa: E402
from wan_costs import SIZES, TRANSFORMER_1_3B  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (no sparsity)
ASSUMED_UTILISATION = {"transformer_fwd_bwd": 0.35, "vae_encode": 0.25, "umt5_forward": 0.35}


def parse_latent(text: str) -> tuple[int, int, int, int]:
    c, t, h, w = (int(x) for x in text.split("x"))
    return c, t, h, w


def tokens(latent: tuple[int, ...]) -> int:
    _, t, h, w = latent
    return t * (h // 2) * (w // 2)  # patch 1 x 2 x 2


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def case_transformer(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    from carv_attrib.attrib.featurizer import build_projector

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a float32 copy first would set the RSS peak
    try:
        transformer = WanTransformer3DModel(**TRANSFORMER_1_3B).to(device=args.device).eval()
    finally:
        torch.set_default_dtype(default)
    keep = transformer._keep_in_fp32_modules or []  # as from_pretrained(torch_dtype=...) keeps them
    for name, p in transformer.named_parameters():
        if dtype != torch.float32 and any(k in name for k in keep):
            p.data = p.data.float()
    build_s = time.monotonic() - t0
    latent = parse_latent(args.latent)
    batch = make_batch(4096, 1, args.draws, latent, text_len=24, seed=0)
    for clip in batch:
        for name in ("latent", "context", "sigma", "eps", "weights"):
            x = getattr(clip, name)
            setattr(clip, name, x.to(args.device, dtype=dtype if x.is_floating_point() else None))
    if args.mode == "kron":
        proj = build_projector("kron", transformer, ("blocks.*",), seed=0, kron_dims=(16, 16))
        layers = len(proj.spec()["layers"])

        def run() -> None:
            proj.batch_features(transformer, batch, "sqnorm")
    else:
        layers = 0

        def run() -> None:
            plain_forward_backward(transformer, batch, param_grads=False, context_grad=True)

    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        t = time.monotonic()
        run()
        sync(args.device)
        times.append(time.monotonic() - t)
    return {
        "params": sum(p.numel() for p in transformer.parameters()),
        "hooked_linear_layers": layers,
        "build_s": round(build_s, 2),
        "seconds": round(statistics.median(times), 3),
        "times": [round(x, 3) for x in times],
        "peak_bytes": peak_bytes(args.device),
    }


def case_vae(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan

    from carv_attrib.models.wan import encode_video

    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(args.device).eval()
    if args.mode == "tiled":
        vae.enable_tiling(
            tile_sample_min_height=64, tile_sample_min_width=64,
            tile_sample_stride_height=48, tile_sample_stride_width=48,
        )  # fmt: skip
    f, h, w = (int(x) for x in args.clip.split("x"))
    x = torch.rand(1, 3, f, h, w, device=args.device) * 2 - 1
    with torch.no_grad():
        encode_video(vae, x)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            t = time.monotonic()
            encode_video(vae, x)
            sync(args.device)
            times.append(time.monotonic() - t)
    return {"seconds": round(statistics.median(times), 3), "peak_bytes": peak_bytes(args.device)}


def run_case(argv: list[str], timeout: float) -> dict[str, Any]:
    """One case in a fresh interpreter: its peak RSS is its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flop_counts(latents: list[tuple[int, ...]], clips: list[str]) -> dict[str, float]:
    """Forward+backward FLOPs of the transformer (1 draw) per latent and VAE encode FLOPs per clip,
    counted on meta tensors."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**TRANSFORMER_1_3B)
        vae = AutoencoderKLWan()
    out: dict[str, float] = {}
    for lat in latents:
        with torch.device("meta"):
            x = torch.randn(1, *lat, requires_grad=True)
            ctx = torch.randn(1, 512, 4096, requires_grad=True)
            t = torch.tensor([500.0])
        with FlopCounterMode(display=False) as fc:
            transformer(x, t, ctx, return_dict=False)[0].square().mean().backward()
        out["x".join(map(str, lat))] = float(fc.get_total_flops())
    for clip in clips:
        f, h, w = (int(v) for v in clip.split("x"))
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as fc:
            vae.encode(torch.randn(1, 3, f, h, w))
        out[f"vae:{clip}"] = float(fc.get_total_flops())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="transformer")
    ap.add_argument("--mode", default="kron")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--latent", default="16x2x16x16")
    ap.add_argument("--clip", default="17x128x128")
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latents", default="16x1x16x16,16x2x16x16", help="reduced latents measured (fp32)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/real_shapes.json"))
    ap.add_argument("--reuse", type=Path, help="take the cases already measured in this JSON")
    ap.add_argument("--redo-bf16", action="store_true", help="measure the bfloat16 cases again")
    args = ap.parse_args()
    if args.worker:
        fn = case_transformer if args.case == "transformer" else case_vae
        print(json.dumps(fn(args)))
        return

    load_start = load_avg()
    common = ["--device", args.device, "--repeats", str(args.repeats), "--draws", str(args.draws)]
    reduced = args.latents.split(",")
    cases: dict[str, Any] = json.loads(args.reuse.read_text())["measured"] if args.reuse else {}
    for lat in reduced:
        for mode in ("plain", "kron"):
            if f"transformer:{mode}:float32:{lat}" in cases:
                continue
            cases[f"transformer:{mode}:float32:{lat}"] = run_case(
                ["--case", "transformer", "--mode", mode, "--latent", lat, *common], 3600
            )
            print(f"{mode} {lat}", cases[f"transformer:{mode}:float32:{lat}"], flush=True)
    big = reduced[-1]
    for mode in ("plain", "kron"):
        key = f"transformer:{mode}:bfloat16:{big}"
        if key in cases and not args.redo_bf16:
            continue
        cases[key] = run_case(
            ["--case", "transformer", "--mode", mode, "--dtype", "bfloat16", "--latent", big, *common], 3600
        )
        print(key, cases[key], flush=True)
    for mode in ("untiled", "tiled"):
        key = f"vae:{mode}:{args.clip}"
        if key in cases:
            continue
        cases[key] = run_case(["--case", "vae", "--mode", mode, "--clip", args.clip, *common], 3600)
        print(key, cases[key], flush=True)

    real = {name: (16, (f - 1) // 4 + 1, h // 8, w // 8) for name, (f, h, w) in SIZES.items()}
    flops = flop_counts(
        [parse_latent(x) for x in reduced] + list(real.values()),
        [args.clip, *[f"{f}x{h}x{w}" for f, h, w in SIZES.values()]],
    )

    # Scaling: time by FLOPs from the largest reduced latent; transformer activation memory linear in
    # tokens through the two reduced latents (weights are the intercept); VAE time by FLOPs.
    def fkey(lat: tuple[int, ...]) -> str:
        return "x".join(map(str, lat))

    k_big = cases[f"transformer:kron:float32:{big}"]
    p_big = cases[f"transformer:plain:float32:{big}"]
    rate = flops[big] * args.draws / p_big["seconds"]  # achieved FLOP/s of a plain fwd+bwd
    t0_, t1_ = (tokens(parse_latent(x)) for x in reduced[:2])
    m0, m1 = (cases[f"transformer:kron:float32:{x}"]["peak_bytes"] for x in reduced[:2])
    per_token = (m1 - m0) / (t1_ - t0_) / args.draws
    scaled = {}
    for name, lat in real.items():
        fl = flops[fkey(lat)]
        scaled[name] = {
            "latent": list(lat),
            "tokens": tokens(lat),
            "transformer_fwd_bwd_flop": fl,
            "cpu_seconds_per_draw_kron": fl / rate * (k_big["seconds"] / p_big["seconds"]),
            "activation_bytes_per_draw_fp32": per_token * tokens(lat),
            "vae_encode_flop": flops[f"vae:{'x'.join(map(str, SIZES[name]))}"],
        }
    umt5 = json.loads((Path(__file__).parent / "results" / "wan_costs.json").read_text())[
        "umt5_forward_512_tokens_flop"
    ]
    kron_over_plain = k_big["seconds"] / p_big["seconds"]
    peak = H100_BF16_DENSE_TFLOPS * 1e12
    gpu = {}
    for name, s in scaled.items():
        c_draw = (
            s["transformer_fwd_bwd_flop"]
            / (peak * ASSUMED_UTILISATION["transformer_fwd_bwd"])
            * kron_over_plain
        )
        c_enc = s["vae_encode_flop"] / (peak * ASSUMED_UTILISATION["vae_encode"]) + umt5 / (
            peak * ASSUMED_UTILISATION["umt5_forward"]
        )
        gpu[name] = {
            "c_enc_s": c_enc,
            "c_draw_s": c_draw,
            "clips_per_gpu_hour": {str(k): 3600 / (c_enc + k * c_draw) for k in (1, 8, 32)},
        }
    doc = {
        "benchmark": "real_shapes",
        "config": {
            "transformer": TRANSFORMER_1_3B, "draws": args.draws, "repeats": args.repeats, "device": args.device,
            "reduced_latents": reduced, "vae_clip": args.clip, "kron": "16x16 on blocks.* (300 Linear)",
            "context": "512 x 4096 stand-in tensor (24 non-zero rows), the UMT5-XXL output shape",
        },
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "measured": cases,
        "flops": flops,
        "cpu_plain_fwd_bwd_flop_per_s": rate,
        "kron_over_plain": {"float32": kron_over_plain, "bfloat16": cases[f"transformer:kron:bfloat16:{big}"]["seconds"] / cases[f"transformer:plain:bfloat16:{big}"]["seconds"]},
        "activation_bytes_per_token_per_draw_fp32": per_token,
        "scaled_to_real": scaled,
        "h100_estimate": {
            "ESTIMATE": "from FLOP counts, the stated peak and assumed utilisation; not measured",
            "peak_bf16_dense_tflops": H100_BF16_DENSE_TFLOPS,
            "assumed_utilisation": ASSUMED_UTILISATION,
            "kron_over_plain_applied": kron_over_plain,
            "sizes": gpu,
        },
    }  # fmt: skip
    write_json(args.out, doc)
    print(json.dumps({"scaled": scaled, "gpu": gpu}, indent=1))


if __name__ == "__main__":
    main()
