"""Generated LDS worlds: data, a Wan2.1 pipeline, a trained model, retrained subset models, ground truth.

A world is everything an attribution method is judged on (the TRAK/D-TRAK linear datamodeling
protocol, anchors-attribution.md §3; dattri's conventions, external-oracles.md §3):

1. data: demo clips (moving shapes) for a training split (`n_train`), held-out queries (`n_query`,
   other captions) and a disjoint pretraining split, encoded once (`run_encode`) at
   `frames`x`size`;
2. model: a Wan2.1 pipeline from the real classes (`preset`'s VAE and UMT5) whose transformer is
   `transformer` (a size override; "lite" = 2 blocks x 2 heads x 64, ffn 512);
3. θ0: a seeded init pretrained on the pretraining split; the *full model* is θ0 fine-tuned on all
   training clips, and each of `subsets` random halves (seeded) is fine-tuned from the same θ0 with
   the same steps, schedule, optimizer and training seed (`carv_attrib.train.train_on_clips`);
4. ground truth: for each subset model and query, the flow-matching loss over `gt_draws` fixed draws
   (stratified σ, seeded ε, the same for every model and query); gt_values = −loss.

Worlds differ in what matters for attribution: the seed (data, init, subsets), the number of clips,
the training length (near-linear vs strongly trained), the timestep density the model was trained
with, and the optimizer. Everything is cached under WORK and a rebuild resumes; trainings run in
`workers` spawned processes with one torch thread each.

    spec = WorldSpec(name="w0", seed=0)
    world = build_world(spec, Path("worlds/w0"))
    world.gt_values()   # (M, Q) float64 = −loss;  world.subset_positions()  # (M, n_train/2)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from carv_attrib.config import EncodeConfig
from carv_attrib.data.latents import CachedClip, iter_cached
from carv_attrib.data.store import read_json, write_json_atomic
from carv_attrib.demo_data import make_demo_data
from carv_attrib.errors import ConfigMismatchError
from carv_attrib.evaluate.retrain import TrainJob, run_trainings, save_transformer
from carv_attrib.evaluate.study import LdsProblem
from carv_attrib.models.tiny import make_model
from carv_attrib.models.wan import load_transformer
from carv_attrib.pipeline.encode import run_encode
from carv_attrib.train import train_on_clips

log = logging.getLogger(__name__)

TRANSFORMERS = {
    "lite": {"num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 512, "num_layers": 2},
    "preset": {},
}


@dataclass(frozen=True)
class WorldSpec:
    """What fixes a world's numbers (checked on resume)."""

    name: str
    seed: int = 0
    n_train: int = 48
    n_query: int = 12
    n_pretrain: int = 48
    subsets: int = 32
    steps: int = 100  # fine-tuning steps of the full model and of every subset model
    pretrain_steps: int = 150
    batch_clips: int = 4
    train_draws: int = 2
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    density: str = "uniform"  # p(σ) the model is trained with
    gt_draws: int = 128
    frames: int = 9
    size: int = 32
    preset: str = "small"
    transformer: str = "lite"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class World:
    """The paths of a built (or partly built) world under `root`."""

    def __init__(self, spec: WorldSpec, root: Path):
        self.spec, self.root = spec, Path(root)

    @property
    def model(self) -> Path:  # pipeline dir; transformer/ = the full model once trained
        return self.root / "model"

    @property
    def init(self) -> Path:
        return self.root / "init"

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    def run(self, split: str) -> Path:
        return self.root / "runs" / split

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def second_moments_path(self) -> Path:
        """Adam's v̂ of the full model (AdamW worlds): {param name: tensor}."""
        return self.model_dir("full") / "adam_v.pt"

    def clips(self, split: str) -> list[CachedClip]:
        return list(iter_cached(self.run(split)))

    def subset_positions(self) -> np.ndarray:
        """(M, n_train/2) sorted training positions of each random half (seeded by the world)."""
        rng = np.random.default_rng(self.spec.seed + 17)
        half = self.spec.n_train // 2
        return np.stack(
            [np.sort(rng.choice(self.spec.n_train, half, replace=False)) for _ in range(self.spec.subsets)]
        )

    def problem(self) -> LdsProblem:
        """The LDS problem of this world: its full model (MODEL/transformer), clips, subsets, ground truth."""
        return LdsProblem(
            name=self.spec.name,
            model=str(self.model),
            checkpoint=None,
            train=self.clips("train"),
            query=self.clips("query"),
            positions=self.subset_positions(),
            gt_values=self.gt_values(),
            adam_moments=str(self.second_moments_path) if self.second_moments_path.exists() else None,
        )

    def gt_values(self) -> np.ndarray:
        """(M, Q) float64: −(query loss) of each subset model (dattri's convention: larger = better)."""
        rows = [
            read_json(self.model_dir(f"subset-{m:03d}") / "gt.json")["query_loss"]
            for m in range(self.spec.subsets)
        ]
        return -np.asarray(rows, dtype=np.float64)


# -- building -------------------------------------------------------------------------------------
def _prepare_data(world: World) -> None:
    s = world.spec
    model = world.model
    if not (model / "model_index.json").exists():
        make_model(str(model), s.preset, seed=s.seed)
    splits = {"train": (s.n_train, 0), "query": (s.n_query, 1), "pretrain": (s.n_pretrain, 2)}
    for split, (n, offset) in splits.items():
        started = (world.run(split) / "latents" / "config.json").exists()
        if started and world.clips(split):
            continue
        manifest = make_demo_data(world.data(split), clips=n, seed=1000 * s.seed + offset)
        run_encode(
            EncodeConfig(
                manifest=manifest,
                videos=world.data(split) / "videos",
                model=str(model),
                run=world.run(split),
                frames=s.frames,
                size=f"{s.size}x{s.size}",
                fps=8,
                workers=0,
                device="cpu",
                shard_size=max(n, 1),
                overwrite=started,  # a cache without live clips: an older layout's, re-encoded
            )
        )


def _build_init(world: World) -> None:
    s = world.spec
    marker = world.root / "init.json"
    if marker.exists():
        return
    base = load_transformer(str(world.model))
    with torch.random.fork_rng():
        torch.manual_seed(s.seed)
        transformer = WanTransformer3DModel.from_config({**base.config, **TRANSFORMERS[s.transformer]})
    t0 = time.monotonic()
    losses = train_on_clips(
        transformer, world.clips("pretrain"), s.pretrain_steps, 2 * s.batch_clips, s.train_draws, 2 * s.lr,
        density=s.density, seed=s.seed + 1,
    )  # fmt: skip
    save_transformer(transformer, world.init)
    params = sum(p.numel() for p in transformer.parameters())
    write_json_atomic(marker, {"params": params, "seconds": time.monotonic() - t0, "loss": losses[-1]})


def _train_jobs(world: World) -> list[TrainJob]:
    """The full model and one model per subset, each fine-tuned from θ0 the same way."""
    s = world.spec
    ids = [c.clip_id for c in world.clips("train")]
    common = dict(
        model=str(world.model), checkpoint=str(world.init), run=str(world.run("train")), query_ids=None,
        query_run=str(world.run("query")), steps=s.steps, batch_clips=s.batch_clips, train_draws=s.train_draws,
        lr=s.lr if s.optimizer == "adamw" else 10 * s.lr,  # SGD: a larger step for comparable progress
        optimizer=s.optimizer, density=s.density, seed=s.seed + 2, gt_draws=s.gt_draws,
    )  # fmt: skip
    jobs = [
        TrainJob(name="full", out=str(world.model_dir("full")), train_ids=None, save_moments=True, **common)
    ]
    for m, idx in enumerate(world.subset_positions()):
        name = f"subset-{m:03d}"
        jobs.append(
            TrainJob(name=name, out=str(world.model_dir(name)), train_ids=[ids[i] for i in idx], **common)
        )
    return jobs


def build_world(
    spec: WorldSpec, root: Path, workers: int = 2, say: Callable[[str], None] = lambda s: None
) -> World:
    """Build (or resume) a world under `root`; refuses a `root` built from another spec (exit 2)."""
    world = World(spec, root)
    world.root.mkdir(parents=True, exist_ok=True)
    spec_path = world.root / "world.json"
    if spec_path.exists() and read_json(spec_path) != spec.to_dict():
        raise ConfigMismatchError(
            f"{root} holds another world ({read_json(spec_path)}); use another directory"
        )
    write_json_atomic(spec_path, spec.to_dict())
    say(f"{spec.name}: data and model")
    _prepare_data(world)
    say(f"{spec.name}: θ0 ({spec.pretrain_steps} pretraining steps)")
    _build_init(world)
    jobs = _train_jobs(world)
    todo = [j for j in jobs if not (Path(j.out) / "gt.json").exists()]
    say(f"{spec.name}: {len(todo)} of {len(jobs)} trainings to run ({spec.optimizer}, {spec.steps} steps)")
    run_trainings(jobs, workers, lambda m: say(f"{spec.name}: {m}"))
    installed = world.root / "installed.json"
    if not installed.exists():  # the full model becomes MODEL/transformer for featurize
        full = WanTransformer3DModel.from_pretrained(str(world.model_dir("full") / "transformer"))
        save_transformer(full, world.model / "transformer")
        write_json_atomic(installed, {"transformer": "models/full/transformer"})
    return world


# Four worlds that differ in what matters (the list): seed and size, training length,
# the training timestep density, the optimizer.
STANDARD_WORLDS = (
    WorldSpec(name="base", seed=0),
    WorldSpec(name="long-logitnormal", seed=1, n_train=64, steps=300, density="logit-normal:0,1"),
    WorldSpec(name="shift-short", seed=2, n_train=40, steps=50, density="shift:3"),
    WorldSpec(name="sgd", seed=3, optimizer="sgd", steps=150),
)
