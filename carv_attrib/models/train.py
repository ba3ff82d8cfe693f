"""Train (or fine-tune) a Wan transformer with flow matching on a run's latent cache.

Random weights make gradient statistics meaningless, so the demo and the benchmarks first teach
the tiny/small model the demo data. The loss is the project's own objective
(`carv_attrib.carv.objective.clip_objective`), with σ ~ p(σ) drawn iid per step, i.e. the teacher
objective whose gradients carv-attrib later attributes.

    from carv_attrib.models.train import TrainConfig, train_transformer
    losses = train_transformer(TrainConfig(run="runs/demo", model="models/tiny-wan", steps=300, out="ft/"))

The pieces (`make_optimizer`, `draw_minibatch`, `minibatch_backward`, `optimizer_step`) are what
`carv_attrib.pipeline.finetune` (`carv-attrib finetune`: checkpoints, resume, LoRA) steps with, so the
command and these library trainings optimise the same loss the same way.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
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
    # where to save the transformer (a diffusers transformer directory); required: MODEL is never
    # written unless a caller names MODEL/transformer itself (the demo's and benchmarks' own models)
    out: Path | str | None = None
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
    p = make_density(density)
    gen = torch.Generator().manual_seed(seed)
    contexts = [pad_context(c.text_emb) for c in clips]  # (1, 512, D) each, padded once
    transformer.train()
    for prm in transformer.parameters():
        prm.requires_grad_(True)
    params = [prm for prm in transformer.parameters() if prm.requires_grad]
    opt, sched = make_optimizer(params, optimizer, lr)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if full_batch:
            total = _full_batch_loss(transformer, clips, contexts, step, draws, p, seed)
            total.backward()
            loss = float(total.detach())
        else:
            batch = draw_minibatch(clips, batch_clips, draws, p, gen)
            loss = minibatch_backward(transformer, clips, contexts, batch)
        optimizer_step(params, opt, sched)
        losses.append(loss)
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


# What `carv-attrib finetune` writes in OUT beside the weights: its settings, fingerprint, status and
# losses (`carv_attrib.pipeline.finetune`); evaluate --lora reads a recipe from it.
FINETUNE_RECORD = "carv_finetune.json"


def read_finetune_record(out: Path | str) -> dict[str, Any] | None:
    """OUT/carv_finetune.json, or None when absent or unreadable."""
    try:
        doc = json.loads((Path(out) / FINETUNE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "fingerprint" in doc else None


WARMUP_STEPS = 20  # linear learning-rate warm-up over the first steps, then constant
FULL_BATCH_CHUNK = 16  # clips per forward in full-batch training
CLIPS_PER_FORWARD = 8  # minibatch training: clips of one latent shape sharing a forward (and backward)


def warmup(step: int) -> float:
    """The learning-rate factor at `step`: (step + 1) / WARMUP_STEPS, at most 1. It does not depend on
    the total number of steps, so N steps then M more are the N + M steps of one run."""
    return min(1.0, (step + 1) / WARMUP_STEPS)


def make_optimizer(
    params: list[torch.nn.Parameter], optimizer: str = "adamw", lr: float = 2e-3
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay) or SGD with momentum 0.9 over `params`, with the `warmup` schedule."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:  # SGD with momentum: the same schedule, a learning rate of its own scale
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


class MixedPrecision(torch.nn.Module):
    """`module` called under `torch.autocast(dtype)`, its first output cast back to float32.

    Mixed precision with fp32 master weights: the module's parameters stay float32 (the optimizer
    updates them and keeps its state in float32); autocast runs the matmuls (linear, attention,
    convolution) of the forward in `dtype` (bfloat16: float32's range, so no loss scaling) and its
    backward follows the same casts. The model output v (K, C, T, h, w) comes back float32, so the
    loss is reduced and backpropagated from float32. Same call signature as the module. (RMSNorm
    then meets bf16 inputs with fp32 weights and takes torch's unfused kernel; its warning is muted.)
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device_type = next(self.module.parameters()).device.type
        with warnings.catch_warnings(), torch.autocast(device_type=device_type, dtype=self.dtype):
            # RMSNorm of a bf16 input with fp32 weights takes the unfused kernel: expected, said once here
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].float(), *out[1:])
        return out.float()


def optimizer_step(
    params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """Clip the gradient norm to 1, step the optimizer and the schedule."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


Draw = tuple[int, torch.Tensor, torch.Tensor]  # (clip index, σ (K,) float64, ε (K, C, T, h, w))


def draw_minibatch(
    clips: list[Any], batch_clips: int, draws: int, p: Any, gen: torch.Generator
) -> list[Draw]:
    """One minibatch step's draws from `gen`: `batch_clips` clips with replacement, then per clip in
    turn K σ ~ p and K ε. All the step's randomness comes from `gen`, so saving its state between
    steps (`carv_attrib.pipeline.finetune`'s checkpoints) resumes the same sequence."""
    idx = torch.randint(len(clips), (min(batch_clips, len(clips)),), generator=gen).tolist()
    out = []
    for i in idx:
        z = clips[i].latent
        sigma = p.icdf(torch.rand(draws, generator=gen, dtype=torch.float64))  # (K,) σ ~ p
        eps = torch.randn((draws, *z.shape), generator=gen)  # (K, C, T, h, w)
        out.append((i, sigma, eps))
    return out


def minibatch_backward(
    transformer: Any,
    clips: list[Any],
    contexts: Sequence[torch.Tensor],  # (1, 512, D) per clip (a list, or padded on demand)
    batch: list[Draw],
    clips_per_forward: int = CLIPS_PER_FORWARD,
) -> float:
    """Backpropagate the minibatch loss (1/n) Σ_i mean_k ℓ(σ_ik, ε_ik) (`clip_objective`'s "loss"
    with unit weights) and return its value. Clips of one latent shape share a forward and its
    backward, `clips_per_forward` at a time (the gradients accumulate: the memory of one chunk, the
    gradient of the whole)."""
    groups: dict[tuple[int, ...], list[Draw]] = {}
    for item in batch:
        groups.setdefault(tuple(clips[item[0]].latent.shape), []).append(item)
    total = 0.0
    for items in groups.values():
        for start in range(0, len(items), clips_per_forward):
            chunk = items[start : start + clips_per_forward]
            if len(chunk) == 1:  # one clip: its context passed once and broadcast over the draws
                i, sigma, eps = chunk[0]
                obj, _ = clip_objective(
                    transformer, clips[i].latent, contexts[i], sigma, eps, torch.ones(len(sigma))
                )
                part = obj / len(batch)
                part.backward()
                total += float(part.detach())
                continue
            part = _shared_forward_loss(
                transformer,
                [clips[i].latent for i, _, _ in chunk],
                [contexts[i] for i, _, _ in chunk],
                [sigma.float() for _, sigma, _ in chunk],
                [eps for _, _, eps in chunk],
                denom=chunk[0][1].shape[0] * len(batch),
            )
            part.backward()
            total += float(part.detach())
    return total


def _shared_forward_loss(
    transformer: Any,
    zs: list[torch.Tensor],
    contexts: list[torch.Tensor],
    sigmas: list[torch.Tensor],
    epss: list[torch.Tensor],
    denom: float,
) -> torch.Tensor:
    """Σ over the clips and their K draws of ℓ = mean((v − (ε − z))²), divided by `denom`, from ONE
    forward: clips of one latent shape z (C, T, h, w), contexts (1, 512, D), σ (K,) float32 and
    ε (K, C, T, h, w) each (the flow-matching objective of `clip_objective`, batched over clips)."""
    device = next(transformer.parameters()).device
    xs, ts, ctx, targets = [], [], [], []
    for z, c, sigma, eps in zip(zs, contexts, sigmas, epss):
        k = sigma.shape[0]
        s = sigma.view(k, 1, 1, 1, 1)
        xs.append((1 - s) * z[None] + s * eps)
        targets.append(eps - z[None])
        ts.append(sigma * TIMESTEP_SCALE)
        ctx.append(c.expand(k, -1, -1))
    v = transformer(
        hidden_states=torch.cat(xs).to(device), timestep=torch.cat(ts).to(device),
        encoder_hidden_states=torch.cat(ctx).to(device), return_dict=False,
    )[0]  # (n·K, C, T, h, w)  # fmt: skip
    return (v - torch.cat(targets).to(device)).pow(2).flatten(1).mean(1).sum() / denom


def _full_batch_loss(
    transformer: Any, clips: list[Any], contexts: list[torch.Tensor], step: int, draws: int, p: Any, seed: int
) -> torch.Tensor:
    """mean over clips of mean_k ℓ(σ_k, ε_k) at `step`, draws counter-based per (clip, step) (see
    `train_on_clips`); clips of one latent shape share a forward, `FULL_BATCH_CHUNK` at a time."""
    ks = range(step * draws, (step + 1) * draws)
    total = None
    for start in range(0, len(clips), FULL_BATCH_CHUNK):
        chunk = range(start, min(start + FULL_BATCH_CHUNK, len(clips)))
        zs, sigmas, epss = [], [], []
        for i in chunk:
            z = clips[i].latent  # (C, T, h, w)
            stream = clip_stream(clips[i].clip_id)
            sigmas.append(p.icdf(uniforms(seed, stream, ks)).float())  # (K,)
            epss.append(noise(seed, stream, ks, tuple(z.shape)))  # (K, C, T, h, w)
            zs.append(z)
        if len({z.shape for z in zs}) != 1:  # mixed latent shapes: one clip per forward
            raise ValueError("full-batch training needs clips of one latent shape")
        part = _shared_forward_loss(
            transformer, zs, [contexts[i] for i in chunk], sigmas, epss, denom=draws * len(clips)
        )
        total = part if total is None else total + part
    assert total is not None
    return total


def train_transformer(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train MODEL's transformer on RUN's cached clips and save it to `cfg.out` (diffusers layout).
    ValueError when `cfg.out` is None (it used to default to MODEL/transformer, overwriting the base
    model; `carv-attrib finetune` / `carv_attrib.pipeline.finetune` is the user-facing stage)."""
    if cfg.out is None:
        raise ValueError("TrainConfig.out: name the directory to save the trained transformer in")

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
    transformer.save_pretrained(str(cfg.out))
    return losses
