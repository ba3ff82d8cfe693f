"""Generated LDS worlds: data, a Wan2.1 pipeline, a trained model, retrained subset models, ground truth.

A world is everything an attribution method is judged on (the TRAK/D-TRAK linear datamodeling
protocol, anchors-attribution.md §3; dattri's conventions, external-oracles.md §3):

1. data: demo clips (moving shapes) for a training split (`n_train`), held-out queries (`n_query`,
   other captions) and, for fine-tuned worlds, a disjoint pretraining split, encoded once at
   `frames`x`size` by the `encode` stage the caller passes (`carv_attrib.pipeline.encode.run_encode`,
   whose `models.clip_encoder.ClipEncoder` encodes every training clip and query: this module sits
   below the stages and does not import them);
2. model: a Wan2.1 pipeline from the real classes (`preset`'s VAE and UMT5) whose transformer is
   `transformer` (a size override; "lite" = 2 blocks x 2 heads x 64, ffn 512);
3. θ0: a seeded init, either pretrained on the pretraining split (`init="pretrained"`: the world is
   a fine-tune) or left random (`init="scratch"`: the world is trained from scratch); the *full
   model* is θ0 trained on all training clips, and each of `subsets` random halves (seeded) is
   trained from the same θ0 with the same steps, schedule, optimizer and training seed
   (`carv_attrib.models.train.train_on_clips`: minibatches of `batch_clips`, or `full_batch`);
4. ground truth: for each subset model and query, the flow-matching loss over `gt_draws` fixed draws
   (stratified σ over the world's training density, seeded ε, the same for every model and query);
   gt_values = −loss.

Worlds differ in what matters for attribution: trained from scratch or fine-tuned, the seed (data,
init, subsets), the number of clips, the training length (near-linear vs strongly trained), the
timestep density the model was trained with, the optimizer and the batch rule. Everything is cached
under WORK (WORK/world.json holds the spec and a one-line description) and a rebuild resumes;
trainings run in `workers` spawned processes with one torch thread each.

    spec = WorldSpec(name="w0", seed=0)
    world = build_world(spec, Path("worlds/w0"), encode=run_encode)   # pipeline.encode.run_encode
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
from carv_attrib.errors import ConfigMismatchError
from carv_attrib.lds.retrain import TrainJob, run_trainings, save_transformer, subset_model
from carv_attrib.lds.study import LdsProblem
from carv_attrib.lds.synthetic import make_demo_data
from carv_attrib.models.tiny import make_model
from carv_attrib.models.train import train_on_clips
from carv_attrib.models.wan import load_transformer
from carv_attrib.store.latents import CachedClip, iter_cached
from carv_attrib.store.shards import read_json, write_json_atomic

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
    init: str = "pretrained"  # pretrained (θ0 pretrained on other clips: a fine-tune) | scratch (θ0 random)
    full_batch: bool = False  # every training clip at every step (else minibatches of batch_clips)
    train_seeds: int = 1  # models per subset (training seeds), their query losses averaged (TRAK §C)
    gt_draws: int = 128
    frames: int = 9
    size: int = 32
    preset: str = "small"
    transformer: str = "lite"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; use one of {', '.join(INITS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: how the world's model was made (what a reader of a results table needs)."""
        start = "trained from scratch" if self.init == "scratch" else (
            f"fine-tuned from a base pretrained {self.pretrain_steps} steps on {self.n_pretrain} other clips"
        )  # fmt: skip
        batch = "full-batch" if self.full_batch else f"batch {self.batch_clips}"
        return (
            f"{start}: {self.n_train} clips, {self.steps} {batch} {self.optimizer} steps, σ ~ {self.density}; "
            f"{self.subsets} subsets, {self.n_query} queries, {self.frames}x{self.size}x{self.size}, "
            f"transformer {self.transformer}, seed {self.seed}"
        )


INITS = ("pretrained", "scratch")


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
            density=self.spec.density,
        )

    def gt_values(self) -> np.ndarray:
        """(M, Q) float64: −(query loss) of each subset, averaged over its `train_seeds` models
        (dattri's convention: larger = better)."""
        rows = [
            np.mean(
                [
                    read_json(self.model_dir(subset_model(m, s)) / "gt.json")["query_loss"]
                    for s in range(self.spec.train_seeds)
                ],
                axis=0,
            )
            for m in range(self.spec.subsets)
        ]
        return -np.asarray(rows, dtype=np.float64)


# -- building -------------------------------------------------------------------------------------
EncodeFn = Callable[[EncodeConfig], object]  # the encode stage: `carv_attrib.pipeline.encode.run_encode`


def _prepare_data(world: World, encode: EncodeFn) -> None:
    s = world.spec
    model = world.model
    if not (model / "model_index.json").exists():
        make_model(str(model), s.preset, seed=s.seed)
    splits = {"train": (s.n_train, 0), "query": (s.n_query, 1)}
    if s.init == "pretrained":
        splits["pretrain"] = (s.n_pretrain, 2)
    for split, (n, offset) in splits.items():
        started = (world.run(split) / "latents" / "config.json").exists()
        if started and world.clips(split):
            continue
        manifest = make_demo_data(world.data(split), clips=n, seed=1000 * s.seed + offset)
        encode(
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
    losses = [float("nan")]
    if s.init == "pretrained":
        losses = train_on_clips(
            transformer, world.clips("pretrain"), s.pretrain_steps, 2 * s.batch_clips, s.train_draws,
            2 * s.lr, density=s.density, seed=s.seed + 1,
        )  # fmt: skip
    save_transformer(transformer, world.init)
    params = sum(p.numel() for p in transformer.parameters())
    write_json_atomic(
        marker, {"init": s.init, "params": params, "seconds": time.monotonic() - t0, "loss": losses[-1]}
    )


def _train_jobs(world: World) -> list[TrainJob]:
    """The full model and one model per subset, each fine-tuned from θ0 the same way."""
    s = world.spec
    ids = [c.clip_id for c in world.clips("train")]
    common = dict(
        model=str(world.model), checkpoint=str(world.init), run=str(world.run("train")), query_ids=None,
        query_run=str(world.run("query")), steps=s.steps, batch_clips=s.batch_clips, train_draws=s.train_draws,
        lr=s.lr if s.optimizer == "adamw" else 10 * s.lr,  # SGD: a larger step for comparable progress
        optimizer=s.optimizer, density=s.density, seed=s.seed + 2, gt_draws=s.gt_draws,
        full_batch=s.full_batch,
    )  # fmt: skip
    jobs = [
        TrainJob(name="full", out=str(world.model_dir("full")), train_ids=None, save_moments=True, **common)
    ]
    for m, idx in enumerate(world.subset_positions()):
        for seed in range(s.train_seeds):
            name = subset_model(m, seed)
            job = TrainJob(
                name=name, out=str(world.model_dir(name)), train_ids=[ids[i] for i in idx], **common
            )
            jobs.append(dataclasses.replace(job, seed=job.seed + 1000 * seed))
    return jobs


def build_world(
    spec: WorldSpec,
    root: Path,
    workers: int = 2,
    say: Callable[[str], None] = lambda s: None,
    *,
    encode: EncodeFn,
) -> World:
    """Build (or resume) a world under `root`, its clips encoded by `encode` (the encode stage,
    `run_encode`); refuses a `root` built from another spec (exit 2)."""
    world = World(spec, root)
    world.root.mkdir(parents=True, exist_ok=True)
    spec_path = world.root / "world.json"
    if spec_path.exists():
        # fields an older world.json lacks are read as their defaults (the world they describe)
        defaults = {f.name: f.default for f in dataclasses.fields(WorldSpec)}
        held = {**defaults, **{k: v for k, v in read_json(spec_path).items() if k != "description"}}
        if held != spec.to_dict():
            raise ConfigMismatchError(f"{root} holds another world ({held}); use another directory")
    write_json_atomic(spec_path, {**spec.to_dict(), "description": spec.describe()})
    say(f"{spec.name}: data and model")
    _prepare_data(world, encode)
    say(
        f"{spec.name}: θ0 "
        + (f"({spec.pretrain_steps} pretraining steps)" if spec.init == "pretrained" else "(random)")
    )
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


# The suite defaults are chosen on: nine worlds of different kinds (the faithfulness issue's list):
# fine-tuned from a pretrained base and trained from scratch; uniform, logit-normal and shifted
# timestep densities; AdamW and SGD; short (40-60 steps), medium (100-150) and long (300)
# training; minibatch and full-batch; 64 clips each. Full-batch worlds take one draw per clip per
# step (the full batch already averages).
# Training is chaotic at this size: retraining one subset with another seed moved its query loss
# as much as changing the subset did (sd 0.005 against 0.004, scratch-uniform), so every world
# averages each subset's ground truth over `train_seeds` trainings (TRAK's protocol).
_SUITE = dict(n_train=64, n_query=16, subsets=32)
_FULL = dict(full_batch=True, train_draws=1)
_SCRATCH = dict(init="scratch", lr=2e-3)
_LOGITNORMAL = "logit-normal:0,1"
WORLD_SUITE = (
    WorldSpec(name="ft-uniform", seed=10, **_SUITE, train_seeds=3),
    WorldSpec(name="ft-logitnormal-long", seed=11, steps=300, density=_LOGITNORMAL, **_SUITE, train_seeds=2),
    WorldSpec(name="ft-shift-short", seed=12, steps=40, density="shift:3", **_SUITE, train_seeds=3),
    WorldSpec(name="ft-sgd", seed=13, optimizer="sgd", steps=150, **_SUITE, train_seeds=3),
    WorldSpec(
        name="ft-fullbatch-logitnormal", seed=14, density=_LOGITNORMAL, **_SUITE, **_FULL, train_seeds=2
    ),
    WorldSpec(name="scratch-uniform", seed=16, **_SUITE, **_FULL, **_SCRATCH, train_seeds=3),
    WorldSpec(
        name="scratch-logitnormal-sgd",
        seed=17,
        optimizer="sgd",
        steps=150,
        density=_LOGITNORMAL,
        **_SUITE,
        **_FULL,
        **_SCRATCH,
        train_seeds=2,
    ),  # fmt: skip
    WorldSpec(name="scratch-shift", seed=18, density="shift:3", **_SUITE, **_FULL, **_SCRATCH, train_seeds=2),
    WorldSpec(
        name="scratch-minibatch-short", seed=19, steps=60, batch_clips=8, **_SUITE, **_SCRATCH, train_seeds=3
    ),
)
