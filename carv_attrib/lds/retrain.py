"""Subset retraining for LDS: fine-tune a shared init on subsets of the training clips, measure queries.

One `TrainJob` fine-tunes the init transformer (MODEL's, or a checkpoint) on some training clips of
a run with `carv_attrib.models.train.train_on_clips`, saves it, and records each query's flow-matching loss
over fixed ground-truth draws (`gt_rule`). A `LoraTrainJob` instead trains a fresh LoRA adapter on
the frozen base with `carv-attrib finetune --lora`'s recipe (`train_lora`), so a retrained adapter
is the one finetune would write for those clips. Jobs run in spawned worker processes (one torch
thread each) and are cached: a job whose gt.json exists is not rerun.

    jobs = [TrainJob(name="subset-000", out="work/models/subset-000", train_ids=[...], ...), ...]
    results = run_trainings(jobs, workers=2)   # {name: {"name", "query_loss": [...], ...}}
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.objective import clip_objective
from carv_attrib.carv.timesteps import density as make_density
from carv_attrib.models.lora import add_lora, save_lora
from carv_attrib.models.train import (
    CLIPS_PER_FORWARD,
    draw_minibatch,
    make_optimizer,
    minibatch_backward,
    optimizer_step,
    train_on_clips,
)
from carv_attrib.models.wan import load_transformer, pad_context
from carv_attrib.store.latents import CachedClip, iter_cached
from carv_attrib.store.shards import write_json_atomic

GT_SEED = 1_000_003  # ground-truth draws: disjoint from estimator seeds and the plan's pilot


def gt_rule(k: int, density: str = "uniform") -> DrawRule:
    """The fixed ground-truth draws (stratified σ over the training density p, seeded ε), shared by
    all models and queries: the measured output is the query's training objective."""
    return DrawRule(seed=GT_SEED, scheme="stratified", k=k, density=density, noise="shared")


def query_losses(
    transformer: torch.nn.Module, queries: Sequence[CachedClip], k: int, density: str = "uniform"
) -> np.ndarray:
    """(Q,) mean flow-matching loss of each query over the k fixed ground-truth draws."""
    rule = gt_rule(k, density)
    out = []
    with torch.no_grad():
        for q in queries:
            sigma, w, eps = rule.draws_for(0, tuple(q.latent.shape))  # (k,), (k,), (k, C, T, h, w)
            obj, _ = clip_objective(transformer, q.latent, pad_context(q.text_emb), sigma, eps, w)
            out.append(float(obj))
    return np.array(out)


def save_transformer(transformer: torch.nn.Module, out: Path) -> None:
    """save_pretrained into a temporary dir, then rename: a half-written model never looks done."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@dataclass
class TrainJob:
    """Fine-tune MODEL's transformer (or `checkpoint`) on `train_ids` of `run` (None: all ok clips),
    save it to OUT/transformer and the query losses to OUT/gt.json."""

    name: str
    out: str
    model: str
    checkpoint: str | None
    run: str
    train_ids: list[int] | None
    query_ids: list[int] | None  # None: every ok clip of `query_run`
    query_run: str | None = None  # None: `run` holds the queries too
    steps: int = 50
    batch_clips: int = 4
    train_draws: int = 2
    lr: float = 1e-3
    optimizer: str = "adamw"
    density: str = "uniform"
    seed: int = 0
    gt_draws: int = 64
    save_moments: bool = False  # Adam's v̂ to OUT/adam_v.pt (for the optimizer-aware preconditioner)
    full_batch: bool = False  # every clip at every step, counter-based draws (`train_on_clips`)


def _clips(run: str, ids: Sequence[int] | None) -> list[CachedClip]:
    clips = list(iter_cached(run))
    if ids is None:
        return clips
    by_id = {c.clip_id: c for c in clips}
    return [by_id[i] for i in ids]


def train_job(job: TrainJob) -> dict[str, Any]:
    out = Path(job.out)
    marker = out / "gt.json"
    if marker.exists():
        return json.loads(marker.read_text())
    t0 = time.monotonic()
    transformer = load_transformer(job.model, job.checkpoint)
    moments: dict[str, torch.Tensor] | None = {} if job.save_moments else None
    losses = train_on_clips(
        transformer, _clips(job.run, job.train_ids), job.steps, job.batch_clips, job.train_draws, job.lr,
        density=job.density, seed=job.seed, optimizer=job.optimizer, second_moments=moments,
        full_batch=job.full_batch,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(transformer, out / "transformer")
    if moments:
        torch.save(moments, out / "adam_v.pt")
    info = {
        "name": job.name,
        "train_ids": job.train_ids,
        "query_loss": query_losses(
            transformer, _clips(job.query_run or job.run, job.query_ids), job.gt_draws, job.density
        ).tolist(),
        "train_loss": [float(losses[0]), float(np.mean(losses[-max(1, len(losses) // 10) :]))],
        "seconds": time.monotonic() - t0,
    }
    write_json_atomic(marker, info)
    return info


def subset_model(m: int, seed: int = 0) -> str:
    """The model name of subset m's training seed `seed` (seed 0 keeps the plain name)."""
    return f"subset-{m:03d}" + (f"-s{seed}" if seed else "")


def worker_init() -> None:
    torch.set_num_threads(1)


@dataclass
class LoraTrainJob:
    """Train a fresh LoRA adapter (rank, alpha, targets; A seeded by `seed`, B = 0) on MODEL's frozen
    transformer with `train_lora` on `train_ids` of `run`, save it to OUT (a diffusers LoRA
    directory, `models.lora.save_lora`) and the query losses to OUT/gt.json. `sample_seed` seeds the
    minibatch generator (None: `seed`, as finetune does)."""

    name: str
    out: str
    model: str
    run: str
    train_ids: list[int] | None
    query_ids: list[int] | None
    rank: int
    alpha: float
    targets: list[str]
    steps: int
    batch_clips: int
    draws: int
    lr: float
    optimizer: str = "adamw"
    density: str = "uniform"
    seed: int = 0
    sample_seed: int | None = None
    gt_draws: int = 64
    clips_per_forward: int = CLIPS_PER_FORWARD
    meta: dict[str, Any] | None = None  # written to OUT/carv_lora.json beside the job's own fields


def train_lora(
    transformer: torch.nn.Module,
    clips: list[CachedClip],
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    steps: int,
    batch_clips: int,
    draws: int,
    lr: float,
    optimizer: str = "adamw",
    density: str = "uniform",
    seed: int = 0,
    sample_seed: int | None = None,
    clips_per_forward: int = CLIPS_PER_FORWARD,
) -> list[float]:
    """Attach a fresh adapter to `transformer` (`add_lora`, seeded by `seed`) and train it for `steps`
    steps; returns each step's minibatch loss. The recipe is `carv_attrib.pipeline.finetune`'s with
    --lora, step for step: a torch.Generator seeded by `sample_seed` (default `seed`) draws each step's
    `batch_clips` clips with replacement and `draws` (σ ~ density, ε) per clip (`draw_minibatch`), the
    flow-matching loss is backpropagated (`minibatch_backward`) and AdamW/SGD steps after the 20-step
    warm-up with the gradient norm clipped to 1 (`optimizer_step`). Same clips in the same order,
    device and thread count: bitwise the adapter finetune writes. The caller's RNG is left as it was."""
    p = make_density(density)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as finetune: only dropout-like layers would draw from it
        add_lora(transformer, rank, alpha, targets, seed=seed)
        params = [prm for prm in transformer.parameters() if prm.requires_grad]
        opt, sched = make_optimizer(params, optimizer, lr)
        gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        contexts = [pad_context(c.text_emb) for c in clips]
        transformer.train()
        losses = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            batch = draw_minibatch(clips, batch_clips, draws, p, gen)
            losses.append(minibatch_backward(transformer, clips, contexts, batch, clips_per_forward))
            optimizer_step(params, opt, sched)
        transformer.eval()
    return losses


def train_lora_job(job: LoraTrainJob) -> dict[str, Any]:
    out = Path(job.out)
    marker = out / "gt.json"
    if marker.exists():
        return json.loads(marker.read_text())
    t0 = time.monotonic()
    transformer = load_transformer(job.model)
    losses = train_lora(
        transformer, _clips(job.run, job.train_ids), rank=job.rank, alpha=job.alpha, targets=job.targets,
        steps=job.steps, batch_clips=job.batch_clips, draws=job.draws, lr=job.lr, optimizer=job.optimizer,
        density=job.density, seed=job.seed, sample_seed=job.sample_seed, clips_per_forward=job.clips_per_forward,
    )  # fmt: skip
    fields = {k: getattr(job, k) for k in ("name", "train_ids", "steps", "seed", "sample_seed")}
    save_lora(transformer, out, meta=(job.meta or {}) | {"retrained": fields})
    info = {
        "name": job.name,
        "train_ids": job.train_ids,
        "query_loss": query_losses(
            transformer, _clips(job.run, job.query_ids), job.gt_draws, job.density
        ).tolist(),
        "train_loss": [float(losses[0]), float(np.mean(losses[-max(1, len(losses) // 10) :]))],
        "seconds": time.monotonic() - t0,
    }
    write_json_atomic(marker, info)
    return info


def run_job(job: TrainJob | LoraTrainJob) -> dict[str, Any]:
    """Run one job of either kind (cached: a job whose gt.json exists returns it)."""
    return train_lora_job(job) if isinstance(job, LoraTrainJob) else train_job(job)


def run_trainings(
    jobs: Sequence[TrainJob | LoraTrainJob], workers: int = 2, say: Callable[[str], None] = lambda s: None
) -> dict[str, dict[str, Any]]:
    """Run the jobs not done yet (in `workers` spawned processes; in-process for workers ≤ 1), saying
    a line per finished training with the time spent and an estimate of the time left; returns
    {name: gt.json} for all of them."""
    todo = [j for j in jobs if not (Path(j.out) / "gt.json").exists()]
    if len(todo) < len(jobs):
        say(f"trainings: {len(jobs) - len(todo)} of {len(jobs)} cached")
    t0 = time.monotonic()

    def done(i: int) -> None:
        spent = time.monotonic() - t0
        left = spent / i * (len(todo) - i)
        say(f"trainings {i}/{len(todo)} ({spent:.0f} s" + (f", about {left:.0f} s left)" if left else ")"))

    if todo and workers <= 1:
        for i, j in enumerate(todo, 1):
            run_job(j)
            done(i)
    elif todo:
        with mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=worker_init) as pool:
            for i, _ in enumerate(pool.imap_unordered(run_job, todo), 1):
                done(i)
    return {j.name: json.loads((Path(j.out) / "gt.json").read_text()) for j in jobs}
