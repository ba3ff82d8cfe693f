"""Steps/s of `carv-attrib finetune` on the tiny and small presets, one forward per clip (the old
`train_on_clips` loop: `--clips-per-forward 1`, `clip_objective` per clip) against clips of one latent
shape sharing a forward (`--clips-per-forward 8`, the default), on the demo's clips (24 clips, 17
frames, 64x64) at the demo's settings (batch 8, 2 draws, lr 2e-3). `--cache-mb` and `--dtype` take
several values too (each combination is run): the streamed latent cache (0: every step reads its clips
from the shards) and bf16 mixed precision, with the shard reads and the peak bytes of clips held.

    .venv/bin/python bench/finetune_speed.py --work bench/_work/finetune --size tiny --steps 30
    .venv/bin/python bench/finetune_speed.py --work bench/_work/finetune --size small --steps 4
    .venv/bin/python bench/finetune_speed.py --work bench/_work/finetune --size tiny --steps 30 \
        --clips-per-forward 8 --cache-mb 2048 0 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clips-per-forward", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cache-mb", type=float, nargs="+", default=[2048.0])
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from carv_attrib.config import EncodeConfig, FinetuneConfig
    from carv_attrib.lds.synthetic import make_demo_data
    from carv_attrib.models.tiny import make_model
    from carv_attrib.pipeline.encode import run_encode
    from carv_attrib.pipeline.finetune import read_record, run_finetune

    w = args.work / args.size
    model, data, run = w / "model", w / "data", w / "run"
    if not (model / "model_index.json").exists():
        make_model(str(model), args.size, seed=0)
    if not (data / "manifest.json").exists():
        make_demo_data(data, clips=24, seed=0)
    run_encode(
        EncodeConfig(
            manifest=data / "manifest.json", videos=data / "videos", model=str(model), run=run, frames=17,
            size="64x64", fps=8, workers=0, device="cpu", shard_size=8,
        )
    )  # fmt: skip
    for cpf in args.clips_per_forward:
        for cache_mb in args.cache_mb:
            for dtype in args.dtype:
                out = w / f"ft-cpf{cpf}-cache{cache_mb:g}-{dtype}"
                shutil.rmtree(out, ignore_errors=True)
                s = run_finetune(
                    FinetuneConfig(
                        run=run, model=str(model), out=out, steps=args.steps, lr=2e-3, batch_clips=8, draws=2,
                        device="cpu", clips_per_forward=cpf, checkpoint_every=args.steps, cache_mb=cache_mb,
                        dtype=dtype,
                    )
                )  # fmt: skip
                losses = read_record(out)["losses"]  # type: ignore[index]
                row = {
                    "size": args.size,
                    "threads": torch.get_num_threads(),
                    "clips_per_forward": cpf,
                    "cache_mb": cache_mb,
                    "dtype": dtype,
                    "steps_per_s": s.steps_per_s,
                    "s_per_step": 1 / s.steps_per_s,
                    "loss_last": losses[-1],
                    "shard_reads": s.shard_reads,
                    "cache_peak_mib": round(s.cache_peak_bytes / 2**20, 3),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
