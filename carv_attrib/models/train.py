"""Train (or fine-tune) a Wan transformer with flow matching on a run's latent cache.

Random weights make gradient statistics meaningless, so the demo and the benchmarks first teach
the tiny/small model the demo data. The loss is the project's own objective
(`carv_attrib.carv.objective.clip_objective`), with σ ~ p(σ) drawn iid per step, i.e. the teacher
objective whose gradients carv-attrib later attributes.

    from carv_attrib.models.train import TrainConfig, train_transformer
    losses = train_transformer(TrainConfig(run="runs/demo", model="models/tiny-wan", steps=300))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from carv_attrib.carv.objective import TIMESTEP_SCALE, clip_objective
from carv_attrib.carv.rng import clip_stream, noise, uniforms
from carv_attrib.carv.timesteps import density as make_density
from carv_attrib.choices import OPTIMIZERS
from carv_attrib.models.wan import load_transformer, pad_context
from carv_attrib.store.latents import iter_cached

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    run: Path | str  # latent cache to train on
    model: str  # pipeline dir whose transformer is trained
    out: Path | str | None = None  # where to save the transformer (default: MODEL/transformer)
    steps: int = 300
    batch_clips: int = 8
    draws: int = 2  # (σ, ε) draws per clip per step
    lr: float = 2e-3
    density: str = "uniform"
    seed: int = 0
    clip_ids: Sequence[int] | None = None  # train on a subset (LDS retraining)
    init: str = "model"  # "model": start from MODEL's weights
    device: str = "cpu"


def load_training_set(run: Path | str, clip_ids: Sequence[int] | None = None) -> list[Any]:
    clips = list(iter_cached(Path(run)))
    if clip_ids is not None:
        keep = set(int(i) for i in clip_ids)
        clips = [c for c in clips if c.clip_id in keep]
    if not clips:
        raise ValueError(f"no cached clips to train on in {run}")
    return clips


def train_on_clips(
    transformer: Any,
    clips: list[Any],
    steps: int,
    batch_clips: int = 8,
    draws: int = 2,
    lr: float = 2e-3,
    density: str = "uniform",
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: str = "adamw",
    second_moments: dict[str, torch.Tensor] | None = None,
    full_batch: bool = False,
) -> list[float]:
    """AdamW (or plain SGD) on Σ_clips mean_k ℓ(σ_k, ε_k), σ ~ p(σ) = `density`; returns the loss per
    step. Deterministic given `seed`.

    Minibatch (default): each step draws `batch_clips` clips with replacement and `draws` fresh
    (σ, ε) per clip from one seeded generator. `full_batch`: each step uses every clip once, and
    clip c's draws at step s are counter-based (`carv.rng`, stream of c's id, counters s·draws + j),
    so two trainings on different subsets see the same draws for the clips they share: the models
    differ by their data only (lower-noise LDS ground truth). Clips then share forwards in chunks
    of `FULL_BATCH_CHUNK` (the same loss, fewer calls).

    second_moments: filled (when given, with AdamW) with Adam's bias-corrected second-moment estimate
    v̂ = exp_avg_sq / (1 − β₂^t) per parameter name (same shapes as the parameters): what an
    optimizer-aware preconditioner divides gradients by (`carv_attrib.lds.reference`).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")

    p = make_density(density)
    gen = torch.Generator().manual_seed(seed)
    device = next(transformer.parameters()).device
    contexts = [pad_context(c.text_emb) for c in clips]  # (1, 512, D) each
    transformer.train()
    for prm in transformer.parameters():
        prm.requires_grad_(True)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    else:  # SGD with momentum: the same schedule, a learning rate of its own scale
        opt = torch.optim.SGD(transformer.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
    losses = []
    for step in range(steps):
        if full_batch:
            opt.zero_grad(set_to_none=True)
            total = _full_batch_loss(transformer, clips, contexts, step, draws, p, seed)
            total.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(total.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
            continue
        idx = torch.randint(len(clips), (min(batch_clips, len(clips)),), generator=gen).tolist()
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i in idx:
            z = clips[i].latent
            sigma = p.icdf(torch.rand(draws, generator=gen, dtype=torch.float64))  # (K,) σ ~ p
            eps = torch.randn((draws, *z.shape), generator=gen)  # (K, C, T, h, w)
            obj, _ = clip_objective(transformer, z, contexts[i], sigma, eps, torch.ones(draws))
            total = total + obj / len(idx)
        total.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(total.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    transformer.eval()
    if second_moments is not None and optimizer == "adamw":
        beta2 = opt.param_groups[0]["betas"][1]
        for name, prm in transformer.named_parameters():
            st = opt.state.get(prm, {})
            if "exp_avg_sq" in st:
                t = float(st["step"])
                second_moments[name] = (st["exp_avg_sq"] / (1 - beta2**t)).detach().cpu().clone()
    return losses


FULL_BATCH_CHUNK = 16  # clips per forward in full-batch training


def _full_batch_loss(
    transformer: Any, clips: list[Any], contexts: list[torch.Tensor], step: int, draws: int, p: Any, seed: int
) -> torch.Tensor:
    """mean over clips of mean_k ℓ(σ_k, ε_k) at `step`, draws counter-based per (clip, step) (see
    `train_on_clips`); clips of one latent shape share a forward, `FULL_BATCH_CHUNK` at a time."""
    ks = range(step * draws, (step + 1) * draws)
    total = None
    for start in range(0, len(clips), FULL_BATCH_CHUNK):
        chunk = range(start, min(start + FULL_BATCH_CHUNK, len(clips)))
        zs, xs, ts, ctx, targets = [], [], [], [], []
        for i in chunk:
            z = clips[i].latent  # (C, T, h, w)
            stream = clip_stream(clips[i].clip_id)
            sigma = p.icdf(uniforms(seed, stream, ks)).float()  # (K,)
            eps = noise(seed, stream, ks, tuple(z.shape))  # (K, C, T, h, w)
            s = sigma.view(draws, 1, 1, 1, 1)
            xs.append((1 - s) * z[None] + s * eps)
            targets.append(eps - z[None])
            ts.append(sigma * TIMESTEP_SCALE)
            ctx.append(contexts[i].expand(draws, -1, -1))
            zs.append(z.shape)
        if len(set(zs)) != 1:  # mixed latent shapes: one clip per forward
            raise ValueError("full-batch training needs clips of one latent shape")
        v = transformer(
            hidden_states=torch.cat(xs), timestep=torch.cat(ts), encoder_hidden_states=torch.cat(ctx),
            return_dict=False,
        )[0]  # (n·K, C, T, h, w)  # fmt: skip
        part = (v - torch.cat(targets)).pow(2).flatten(1).mean(1).sum() / (draws * len(clips))
        total = part if total is None else total + part
    assert total is not None
    return total


def train_transformer(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train MODEL's transformer on RUN's cached clips and save it (diffusers layout)."""

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        transformer = load_transformer(cfg.model, None, device=cfg.device)
        if cfg.init == "random":  # an independent initialisation, for retraining from scratch
            transformer = WanTransformer3DModel.from_config(transformer.config).to(cfg.device)
    clips = load_training_set(cfg.run, cfg.clip_ids)
    t0 = time.monotonic()
    losses = train_on_clips(
        transformer, clips, cfg.steps, cfg.batch_clips, cfg.draws, cfg.lr, cfg.density, cfg.seed, on_step
    )
    log.info(
        "trained %d steps on %d clips in %.1f s, loss %.4f -> %.4f",
        cfg.steps,
        len(clips),
        time.monotonic() - t0,
        losses[0],
        losses[-1],
    )
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.model) / "transformer"
    transformer.save_pretrained(str(out))
    return losses
