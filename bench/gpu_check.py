"""The GPU check in one command and one JSON: Wan2.1-T2V-1.3B at its real configs (random weights)
on a 17×480×832 clip, in bfloat16 and float32.

Measured, each in this process, peak memory reset per case (torch.cuda.max_memory_allocated; on CPU
the process's RSS sampled every 5 ms, weights and the interpreter included):
  encode       the Wan2.1 VAE (diffusers' AutoencoderKLWan defaults) encoding one clip: clips/s
               (the UMT5-XXL prompt encode is not part of it: 5.7 B parameters, once per prompt);
  featurize    one clip at K = 8 draws, `KronProjector` hooks at 16×16 on every Linear of the 30 blocks
               (300 layers, the default 76,800-dim feature), with `--draws-per-backward` chosen from
               free memory: one draw is measured first, then c = ⌊0.8 · free / (one draw's peak
               above the loaded model)⌋ clamped to [1, K]; s/clip and peak memory;
  plain        the same K forwards with one backward per c draws and no hooks or parameter
               gradients (latent and context require grad): the kron/plain ratio is what the
               feature costs over the fwd+bwd it needs anyway;
  faiss        a Flat inner-product index of 10^6 random float32 vectors of --faiss-dim dims: add
               time and search of 64 queries (top-10) in one call; faiss-gpu when importable
               (`faiss.StandardGpuResources`), else faiss-cpu, labelled in "faiss.backend".
Cases are run cheapest first (encode, faiss, featurize bf16, featurize fp32); one not started by
--budget-s (default 360 s; gpu_check.sh kills the run at 440 s, so the check stays under 8 min) is
skipped and says so. The JSON is rewritten after every case: a killed run keeps the finished ones.

`--device cpu` runs the same script at reduced shapes (frames 5×64×64, 2 transformer blocks,
10^4 vectors) so it can be dry-run end to end on a CPU machine: its figures say nothing about a GPU
and the JSON says "CPU DRY RUN at reduced shapes".

    python bench/gpu_check.py --device cuda --out $OUT/gpu_check.json     # what bench/gpu_check.sh runs
    .venv/bin/python bench/gpu_check.py --device cpu --out bench/results/gpu_check_cpu_dryrun.json
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import load_avg, machine_info, write_json  # noqa: E402
from featurize_speed import make_batch, plain_forward_backward  # noqa: E402
from wan_costs import TRANSFORMER_1_3B  # noqa: E402

REAL = {"clip": (17, 480, 832), "layers": 30, "vectors": 1_000_000}
CPU_DRY = {"clip": (5, 64, 64), "layers": 2, "vectors": 10_000}
K = 8
FREE_SHARE = 0.8  # of the free memory the draws of one backward may take


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_now() -> int:
    """The process's resident bytes now (Linux /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


class RssPeak:
    """CPU peak memory per case: a thread samples the RSS every 5 ms (ru_maxrss cannot be reset)."""

    def __init__(self) -> None:
        self.peak = rss_now()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_now())
            time.sleep(0.005)

    def reset(self) -> None:
        self.peak = rss_now()


_RSS: RssPeak | None = None


def reset_peak(device: str) -> None:
    global _RSS
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif _RSS is None:
        _RSS = RssPeak()
    else:
        _RSS.reset()


def peak_bytes(device: str) -> int:
    """Peak since the last reset_peak: allocated GPU bytes on CUDA, sampled RSS on CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    assert _RSS is not None
    return max(_RSS.peak, rss_now())


def now_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    return rss_now()


def free_bytes(device: str) -> float | None:
    from carv_attrib.models.wan import device_free_bytes

    return device_free_bytes(device)


def timed(fn: Any, device: str, repeats: int) -> list[float]:
    """Seconds of `repeats` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.monotonic()
        fn()
        sync(device)
        out.append(time.monotonic() - t)
    return out


def latent_shape(clip: tuple[int, int, int]) -> tuple[int, int, int, int]:
    f, h, w = clip
    return 16, (f - 1) // 4 + 1, h // 8, w // 8


def case_encode(device: str, dtype: torch.dtype, clip: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan

    from carv_attrib.models.wan import encode_video

    reset_peak(device)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan().to(dtype).eval()
    x = torch.rand(1, 3, *clip, device=device) * 2 - 1
    times = timed(lambda: encode_video(vae, x), device, repeats)
    s = statistics.median(times)
    out = {
        "seconds_per_clip": round(s, 3),
        "clips_per_s": round(1 / s, 3),
        "times": [round(t, 3) for t in times],
    }
    out["peak_bytes"] = peak_bytes(device)
    return out


def build_transformer(device: str, dtype: torch.dtype, layers: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on the device: no float32 CPU copy first
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**{**TRANSFORMER_1_3B, "num_layers": layers}).eval()
    finally:
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():  # as from_pretrained(torch_dtype=...) keeps them
        if dtype != torch.float32 and any(k in name for k in model._keep_in_fp32_modules or []):
            p.data = p.data.float()
    return model


def batch_on(device: str, dtype: torch.dtype, latent: tuple[int, ...], draws: int) -> list[Any]:
    batch = make_batch(TRANSFORMER_1_3B["text_dim"], 1, draws, latent, text_len=24, seed=0)
    for clip in batch:
        for name in ("latent", "context", "sigma", "eps", "weights"):
            x = getattr(clip, name)
            setattr(clip, name, x.to(device, dtype=dtype if x.is_floating_point() else None))
    return batch


def sub_batches(batch: list[Any], c: int) -> list[list[Any]]:
    """The clip's K draws in groups of c (one backward each), as `draws_per_backward` = c does."""
    from dataclasses import replace

    (clip,) = batch
    k = clip.sigma.shape[0]
    return [
        [replace(clip, sigma=clip.sigma[a : a + c], weights=clip.weights[a : a + c], eps=clip.eps[a : a + c])]
        for a in range(0, k, c)
    ]


def case_featurize(device: str, dtype: torch.dtype, cfg: dict[str, Any], repeats: int) -> dict[str, Any]:
    from carv_attrib.attrib.featurizer import build_projector

    reset_peak(device)
    t = time.monotonic()
    model = build_transformer(device, dtype, cfg["layers"])
    build_s = time.monotonic() - t
    proj = build_projector("kron", model, ("blocks.*",), seed=0, kron_dims=(16, 16))
    latent = latent_shape(cfg["clip"])
    loaded = now_bytes(device)
    free = free_bytes(device)
    # one draw: its peak above the loaded model sets how many draws one backward can hold
    one = batch_on(device, dtype, latent, 1)
    reset_peak(device)
    proj.batch_features(model, one, "sqnorm", 1)
    per_draw = max(1, peak_bytes(device) - loaded)
    c = K if free is None else int(max(1, min(K, FREE_SHARE * free // per_draw)))
    batch = batch_on(device, dtype, latent, K)
    reset_peak(device)
    kron = timed(lambda: proj.batch_features(model, batch, "sqnorm", c), device, repeats)
    kron_peak = peak_bytes(device)
    parts = sub_batches(batch, c)

    def plain() -> None:
        for part in parts:
            plain_forward_backward(model, part, param_grads=False, context_grad=True)

    reset_peak(device)
    plain_t = timed(plain, device, repeats)
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "hooked_linear_layers": len(proj.spec()["layers"]),
        "feature_dim": int(proj.dim) if hasattr(proj, "dim") else None,
        "latent": list(latent),
        "tokens": latent[1] * (latent[2] // 2) * (latent[3] // 2),
        "build_s": round(build_s, 2),
        "model_bytes": loaded,
        "free_bytes_after_load": free,
        "one_draw_peak_above_model_bytes": per_draw,
        "draws_per_backward": c,
        "draws_per_backward_rule": f"min(K, floor({FREE_SHARE} * free / one draw's peak above the model))",
        "featurize_s_per_clip": round(statistics.median(kron), 3),
        "featurize_times": [round(x, 3) for x in kron],
        "featurize_peak_bytes": kron_peak,
        "plain_fwd_bwd_s_per_clip": round(statistics.median(plain_t), 3),
        "plain_peak_bytes": peak_bytes(device),
        "kron_over_plain": round(statistics.median(kron) / statistics.median(plain_t), 3),
    }
    return out


def case_faiss(device: str, n: int, dim: int) -> dict[str, Any]:
    import faiss

    gpu = device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    rng = np.random.default_rng(0)
    xb = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 65_536):
        xb[a : a + 65_536] = rng.standard_normal((min(65_536, n - a), dim), dtype=np.float32)
    xq = rng.standard_normal((64, dim), dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    t = time.monotonic()
    index.add(xb)
    add_s = time.monotonic() - t
    index.search(xq[:1], 10)  # warm-up
    t = time.monotonic()
    _, ids = index.search(xq, 10)
    search_s = time.monotonic() - t
    exact = np.argsort(-(xb @ xq[0]))[:10]
    return {
        "backend": "faiss-gpu" if gpu else "faiss-cpu",
        "faiss_version": faiss.__version__,
        "vectors": n,
        "dim": dim,
        "factory": "Flat (IndexFlatIP)",
        "add_s": round(add_s, 3),
        "queries": len(xq),
        "search_s": round(search_s, 4),
        "ms_per_query": round(1000 * search_s / len(xq), 3),
        "top10_matches_numpy": bool(set(ids[0].tolist()) == set(exact.tolist())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=360.0)
    ap.add_argument("--faiss-dim", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for the reduced-shape dry run")
    cfg = REAL if cuda else CPU_DRY
    clock = Clock(args.budget_s)
    doc: dict[str, Any] = {
        "benchmark": "gpu_check",
        "label": "GPU run at the real shapes" if cuda else "CPU DRY RUN at reduced shapes: not GPU figures",
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "config": {
            "transformer": {**TRANSFORMER_1_3B, "num_layers": cfg["layers"]},
            "clip_frames_h_w": list(cfg["clip"]),
            "draws_k": K,
            "kron": "16x16 on every Linear of blocks.*",
            "weights": "random (real configs)",
            "context": "512 x 4096 stand-in (24 non-zero rows), the UMT5-XXL output shape",
            "repeats_after_warmup": args.repeats,
            "budget_s": args.budget_s,
        },
        "machine": machine_info(),
        "load_avg_start": load_avg(),
        "cases": {},
    }
    steps: list[tuple[str, Any]] = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        steps.append(
            (f"encode:{name}", lambda d=dtype: case_encode(args.device, d, cfg["clip"], args.repeats))
        )
    steps.append(("faiss", lambda: case_faiss(args.device, cfg["vectors"], args.faiss_dim)))
    for name in args.dtypes.split(","):  # the costliest last: a case past the budget is skipped
        dtype = getattr(torch, name)
        steps.append((f"featurize:{name}", lambda d=dtype: case_featurize(args.device, d, cfg, args.repeats)))
    for key, fn in steps:
        if clock.left() <= 0:
            doc["cases"][key] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            continue
        t = time.monotonic()
        try:
            doc["cases"][key] = fn() | {"case_s": round(time.monotonic() - t, 1)}
        except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others' figures
            doc["cases"][key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(key, doc["cases"][key], flush=True)
        write_json(args.out, doc)  # every case kept even if a later one is killed
    doc["total_s"] = round(time.monotonic() - clock.t0, 1)
    doc["load_avg_end"] = load_avg()
    write_json(args.out, doc)
    print(f"-> {args.out} ({doc['total_s']} s)")


if __name__ == "__main__":
    main()
