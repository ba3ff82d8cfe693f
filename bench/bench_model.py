"""The trained benchmark model shared by bench/ecm.py and bench/lds.py.

Random weights make gradient statistics meaningless, so the benchmarks first train the `small`
Wan config (~4.9 M transformer parameters) on demo clips with flow matching, reusing the project's
own objective (`carv_attrib.models.train`). Everything lands in a work directory and is reused when it is
already there (delete it to rebuild):

    WORK/model/        small Wan2.1 pipeline; model/transformer/ holds the trained weights
    WORK/data/         demo clips + manifest.json
    WORK/run/          latent cache of the training clips (encode stage)
    WORK/trained.json  training losses and timing

Run alone: `.venv/bin/python bench/bench_model.py --work bench/_work/model` (about 3 minutes on
2 cores at the defaults).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BenchModel:
    work: Path
    clips: int = 64
    size: str = "small"
    frames: int = 17
    resolution: int = 64
    train_steps: int = 200
    batch_clips: int = 8
    lr: float = 1e-3
    seed: int = 0

    @property
    def model(self) -> Path:
        return self.work / "model"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def run(self) -> Path:
        return self.work / "run"


def prepare(cfg: BenchModel, log=print) -> BenchModel:
    """Build (or reuse) the model, the data, the latent cache and the trained transformer."""
    from carv_attrib.errors import ConfigMismatchError
    from carv_attrib.lds.synthetic import make_demo_data
    from carv_attrib.models.tiny import make_model
    from carv_attrib.models.train import TrainConfig, train_transformer
    from carv_attrib.pipeline.encode import EncodeConfig, run_encode

    cfg.work.mkdir(parents=True, exist_ok=True)
    if not (cfg.model / "model_index.json").exists():
        log(f"building the {cfg.size} Wan2.1 pipeline -> {cfg.model}")
        make_model(str(cfg.model), cfg.size, seed=cfg.seed)
    if not (cfg.data / "manifest.json").exists():
        log(f"writing {cfg.clips} demo clips -> {cfg.data}")
        make_demo_data(cfg.data, clips=cfg.clips, seed=cfg.seed)
    enc = EncodeConfig(
        manifest=cfg.data / "manifest.json",
        videos=cfg.data / "videos",
        model=str(cfg.model),
        run=cfg.run,
        frames=cfg.frames,
        size=f"{cfg.resolution}x{cfg.resolution}",
        fps=8,
        workers=1,
        device="cpu",
        shard_size=16,
    )
    try:
        run_encode(enc)
    except ConfigMismatchError:  # a cache of an older layout: the same latents, re-encoded
        enc.overwrite = True
        run_encode(enc)
    marker = cfg.work / "trained.json"
    if not marker.exists():
        log(f"training the transformer for {cfg.train_steps} steps on {cfg.clips} clips")
        t0 = time.monotonic()
        losses = train_transformer(
            TrainConfig(
                run=cfg.run,
                model=str(cfg.model),
                steps=cfg.train_steps,
                batch_clips=cfg.batch_clips,
                lr=cfg.lr,
                seed=cfg.seed,
                out=cfg.model / "transformer",  # the benchmark's own model: trained in place
            )
        )
        marker.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in asdict(cfg).items()},
                    "seconds": time.monotonic() - t0,
                    "loss_first": losses[0],
                    "loss_last10": sum(losses[-10:]) / 10,
                    "losses": losses,
                },
                indent=1,
            )
        )
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/model"))
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is robust when the cores are shared)"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = prepare(BenchModel(work=args.work, clips=args.clips, train_steps=args.steps))
    info = json.loads((cfg.work / "trained.json").read_text())
    print(f"trained in {info['seconds']:.0f} s: loss {info['loss_first']:.3f} -> {info['loss_last10']:.3f}")


if __name__ == "__main__":
    main()
