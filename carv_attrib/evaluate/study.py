"""Attribution variants scored by LDS on a world, against the exact reference.

A `Variant` is one way to turn (training clips, queries) into scores:

- kind "product": the tool's own path (`attrib.featurizer`: draw rule, output function, kron or
  dense projection of the selected Linear layers) followed by a preconditioner (identity, cosine,
  trak with `lambda_rel`);
- kind "exact": the unprojected gradient of **all** trainable parameters (K iid draws, common random
  numbers), scored by identity (grad-dot, TracIn), cosine, or `adam`: gᵢᵀ diag(1/(sqrt(v̂)+ε)) g_q with
  Adam's bias-corrected second moment v̂ of the full model's training (one AdamW step's influence;
  falls back to identity when the world was not trained with AdamW).

Each variant is replicated over `replicates` seeds r (projection seed r *and* estimator seed r), so the
CI of `lds_summary` covers queries and both seeds.

    rows = score_variants(world, [Variant("default"), Variant("exact-256", kind="exact", draws=256)])
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carv_attrib.attrib.featurizer import build_draw_rule, build_projector, load_featurizer
from carv_attrib.attrib.precondition import fit_preconditioner
from carv_attrib.carv.objective import clip_objective
from carv_attrib.config import (
    DEFAULT_KRON_DIMS,
    DEFAULT_LAYERS,
    FeaturizeConfig,
    IndexConfig,
    parse_kron_dims,
)
from carv_attrib.data.latents import CachedClip
from carv_attrib.evaluate.lds import lds_per_query, lds_summary
from carv_attrib.models.wan import load_transformer, pad_context, resolve_device

ADAM_EPS = 1e-8  # torch.optim.AdamW's default ε


@dataclass
class LdsProblem:
    """What a variant is judged on: the model to attribute (MODEL + an optional transformer
    checkpoint), training clips and held-out queries, subset positions (M, n_train/2) and the measured
    outputs gt_values (M, Q) = −loss of each subset model; `adam_moments`: Adam's v̂ of the model's
    training ({param name: tensor}) when known."""

    name: str
    model: str
    checkpoint: str | None
    train: list[CachedClip]
    query: list[CachedClip]
    positions: np.ndarray
    gt_values: np.ndarray
    adam_moments: str | None = None
    device: str = "cpu"  # where the settings' featurizers run (`auto`, `cuda`, ...)


_FEATURIZE = {f.name: f.default for f in dataclasses.fields(FeaturizeConfig)}
_INDEX = {f.name: f.default for f in dataclasses.fields(IndexConfig)}


@dataclass(frozen=True)
class Variant:
    """One attribution setting; `draws` is its cost in (σ, ε) draws per clip."""

    # Defaults are featurize's and index's own (read from their configs), so Variant("default") is
    # exactly what `carv-attrib featurize` does.
    name: str
    kind: str = "product"  # product | exact
    draws: int = _FEATURIZE["draws"]
    timesteps: str = _FEATURIZE["timesteps"]
    density: str = "uniform"  # featurize's default when no plan gives one
    output_fn: str = _FEATURIZE["output_fn"]
    noise: str = _FEATURIZE["noise"]
    projector: str = _FEATURIZE["projector"]
    kron_dims: str = DEFAULT_KRON_DIMS
    proj_dim: int | None = None
    layers: tuple[str, ...] = DEFAULT_LAYERS
    precondition: str = _INDEX["precondition"]  # identity | cosine | trak | adam (exact only)
    lambda_rel: float = _INDEX["lambda_rel"]
    replicates: int = 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- features ------------------------------------------------------------------------------------
def product_features(problem: LdsProblem, v: Variant, seed: int, clips: Sequence[CachedClip]) -> np.ndarray:
    """(n, D) float64 features of `clips` through the tool's featurizer (projection and draws seeded by
    `seed`)."""
    rule = build_draw_rule(seed=seed, scheme=v.timesteps, k=v.draws, density=v.density, noise=v.noise)
    dims = None if v.proj_dim else parse_kron_dims(v.kron_dims)
    fz = load_featurizer(
        problem.model, [problem.checkpoint], rule, v.output_fn, problem.device, "float32",
        new_projector=lambda t: build_projector(v.projector, t, v.layers, seed, v.proj_dim, "gaussian", dims),
    )  # fmt: skip
    out = []
    for i in range(0, len(clips), 8):
        f, _, _ = fz.features([(c.clip_id, c.latent, c.text_emb) for c in clips[i : i + 8]])
        out.append(f.double().numpy())
    return np.concatenate(out)


def exact_gradients(
    transformer: torch.nn.Module, clips: Sequence[CachedClip], draws: int, seed: int, output_fn: str = "loss"
) -> np.ndarray:
    """(n, P) float32: each clip's full gradient (all trainable parameters, flattened in
    `named_parameters` order) of its K-draw objective, iid σ ~ uniform with shared noise (the same
    draws for every clip). Draws run in chunks of 64 through one forward each."""
    rule = build_draw_rule(seed=seed, scheme="iid", k=draws, density="uniform", noise="shared")
    params = [p for p in transformer.parameters() if p.requires_grad]
    rows = []
    for c in clips:
        sigma, w, eps = rule.draws_for(0, tuple(c.latent.shape))  # (K,), (K,), (K, C, T, h, w)
        ctx = pad_context(c.text_emb)
        for p in params:
            p.grad = None
        for s in range(0, draws, 64):
            sl = slice(s, s + 64)
            # clip_objective averages over its own chunk: rescale so the chunks sum to the K-draw mean
            obj, _ = clip_objective(transformer, c.latent, ctx, sigma[sl], eps[sl], w[sl], output_fn)
            (obj * (sigma[sl].shape[0] / draws)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).float().cpu().numpy())
    for p in params:
        p.grad = None
    return np.stack(rows)


def _adam_scale(problem: LdsProblem, transformer: torch.nn.Module) -> np.ndarray | None:
    """(P,) 1/(sqrt(v̂)+ε) in `exact_gradients`' order, or None without Adam state."""
    path = problem.adam_moments
    if path is None or not Path(path).exists():
        return None
    v = torch.load(path)
    parts = [
        (1.0 / (v[name].sqrt() + ADAM_EPS)).reshape(-1) if name in v else torch.ones(p.numel())
        for name, p in transformer.named_parameters()
        if p.requires_grad
    ]
    return torch.cat(parts).double().numpy()


# -- scores --------------------------------------------------------------------------------------
def score_matrix(train: np.ndarray, query: np.ndarray, kind: str, lambda_rel: float = 1e-2) -> np.ndarray:
    """(n_train, Q) float64 = prepare_train(Φ_train) @ prepare_query(Φ_query)ᵀ (attrib.precondition)."""
    pre = fit_preconditioner(kind, train, dim=train.shape[1], lambda_rel=lambda_rel)
    return pre.prepare_train(train).astype(np.float64) @ pre.prepare_query(query).astype(np.float64).T


def variant_scores(problem: LdsProblem, v: Variant, seed: int, cache: dict[str, Any]) -> np.ndarray:
    """(n_train, Q) scores of one replicate of a variant."""
    train, query = problem.train, problem.query
    if v.kind == "product":
        ft = product_features(problem, v, seed, train)
        fq = product_features(problem, v, seed, query)
        return score_matrix(ft, fq, v.precondition, v.lambda_rel)
    key = ("exact", v.draws, seed, v.output_fn)
    if key not in cache:
        if "transformer" not in cache:
            cache["transformer"] = load_transformer(
                problem.model, problem.checkpoint, device=resolve_device(problem.device)
            )
        t = cache["transformer"]
        for p in t.parameters():
            p.requires_grad_(True)
        cache[key] = (
            exact_gradients(t, train, v.draws, seed, v.output_fn).astype(np.float64),
            exact_gradients(t, query, v.draws, seed, v.output_fn).astype(np.float64),
        )
    gt, gq = cache[key]
    if v.precondition == "adam":
        if "adam" not in cache:
            cache["adam"] = _adam_scale(problem, cache["transformer"])
        scale = cache["adam"]
        return (gt * scale) @ gq.T if scale is not None else gt @ gq.T
    return score_matrix(gt, gq, v.precondition, v.lambda_rel)


def score_variants(
    problem: LdsProblem, variants: Sequence[Variant], say: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """{variant name: {**variant, lds: lds_summary(...), seconds}} on `problem`."""
    gt_values, positions = problem.gt_values, problem.positions
    cache: dict[str, Any] = {}
    out = {}
    for v in variants:
        t0 = time.monotonic()
        per_query = [
            lds_per_query(variant_scores(problem, v, r, cache), gt_values, positions)
            for r in range(v.replicates)
        ]
        out[v.name] = {
            **v.to_dict(),
            "lds": lds_summary(per_query),
            "seconds": round(time.monotonic() - t0, 2),
        }
        s = out[v.name]["lds"]
        say(f"{problem.name} {v.name}: LDS {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    return out


# Settings `carv-attrib evaluate --variant NAME` knows (K = 8 unless named; exact ones need the full
# gradient of every parameter in memory per clip: small models only).
NAMED_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("default"),
        Variant("iid", timesteps="iid"),
        Variant("stratified", timesteps="stratified"),
        Variant("identity", precondition="identity"),
        Variant("trak", precondition="trak"),
        Variant("kron-8x8", kron_dims="8x8"),
        Variant("kron-32x32", kron_dims="32x32"),
        Variant("all-linear", layers=("*",)),
        Variant("loss", output_fn="loss"),
        Variant("K32", draws=32),
        Variant("exact-8", kind="exact", draws=8, timesteps="iid", precondition="identity"),
        Variant("exact-256", kind="exact", draws=256, timesteps="iid", precondition="identity", replicates=1),
        Variant(
            "exact-256-adam", kind="exact", draws=256, timesteps="iid", precondition="adam", replicates=1
        ),
    )
}
