"""Attribution variants scored by LDS on a problem, beside the fixed exact reference.

A `Variant` is one way to turn (training clips, queries) into scores:

- kind "product": the tool's own path (`attrib.featurizer`: draw rule, output function, kron or
  dense projection of the selected Linear layers) followed by a preconditioner of
  `attrib.precondition` (identity, cosine, trak with `lambda_rel`). Its fields default to
  featurize's and index's own defaults, so `Variant("default")` is what `carv-attrib featurize`
  does; its density defaults to the problem's training density (what a user passes `--density`);
- kind "exact": the fixed reference of `evaluate.reference`: the *training loss*, all trainable
  parameters, unprojected, K iid draws σ ~ p of the problem's training density, with common draws
  (`reference_draws="crn"`) or independent per-clip draws ("per-clip"). It never follows
  featurize's options; only its draws, draw rule and preconditioner are chosen: identity (grad-dot,
  TracIn), cosine, trak (Woodbury on the Gram), or adam: gᵢᵀ diag(1/(sqrt(v̂)+ε)) g_q with the full
  model's AdamW v̂ (identity when the model was not trained with AdamW).

Each variant is replicated over `replicates` seeds r (projection seed r *and* estimator seed r; the
reference's seed r is `REFERENCE_SEED + r`), so the CI of `lds_summary` covers queries and seeds.

    rows = score_variants(problem, [Variant("default"), NAMED_VARIANTS["exact-crn-256"]])
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
from carv_attrib.carv.timesteps import Proposal
from carv_attrib.config import (
    DEFAULT_KRON_DIMS,
    DEFAULT_LAYERS,
    FeaturizeConfig,
    IndexConfig,
    parse_kron_dims,
)
from carv_attrib.lds.gradspace import gram, scores_from_gram
from carv_attrib.lds.metric import (
    common_factor_lds,
    lds_from_sums,
    lds_per_query,
    lds_summary,
    query_centered,
    subset_sums,
)
from carv_attrib.lds.reference import REFERENCE_DRAWS, exact_gradients, reference_rule
from carv_attrib.models.wan import load_transformer, resolve_device
from carv_attrib.search.precondition import DEFAULT_NORMALIZE_ALPHA, fit_preconditioner
from carv_attrib.store.latents import CachedClip

ADAM_EPS = 1e-8  # torch.optim.AdamW's default ε
KINDS = ("product", "exact")
EXACT_PRECONDITIONERS = ("identity", "cosine", "normalize", "trak", "adam")


@dataclass
class LdsProblem:
    """What a variant is judged on: the model to attribute (MODEL + an optional transformer
    checkpoint), training clips and held-out queries, subset positions (M, n_train/2) and the measured
    outputs gt_values (M, Q) = −loss of each subset model; `density` the model's training p(σ) (the
    reference's and, by default, the product variants'); `proposal` the plan's q for stratified-is
    product variants (None: q = p); `adam_moments`: Adam's v̂ of the model's training
    ({param name: tensor}) when known; `lora`: a LoRA adapter directory on the model: product
    variants then attribute through its A/B gradients as `featurize --lora` does (exact when small,
    `attrib.projection.lora_projection`; `layers` unused), and exact variants are refused."""

    name: str
    model: str
    checkpoint: str | None
    train: list[CachedClip]
    query: list[CachedClip]
    positions: np.ndarray
    gt_values: np.ndarray
    adam_moments: str | None = None
    device: str = "cpu"  # where the settings' featurizers run (`auto`, `cuda`, ...)
    density: str = "uniform"
    proposal: Proposal | None = None
    lora: str | None = None


_FEATURIZE = {f.name: f.default for f in dataclasses.fields(FeaturizeConfig)}
_INDEX = {f.name: f.default for f in dataclasses.fields(IndexConfig)}
_PRODUCT_ONLY = ("timesteps", "output_fn", "noise", "projector", "kron_dims", "proj_dim", "layers")


@dataclass(frozen=True)
class Variant:
    """One attribution setting; `draws` is its cost in (σ, ε) draws per clip."""

    # Product defaults are featurize's and index's own (read from their configs), so
    # Variant("default") is exactly what `carv-attrib featurize` does.
    name: str
    kind: str = "product"  # product | exact
    draws: int = _FEATURIZE["draws"]
    timesteps: str = _FEATURIZE["timesteps"]
    density: str | None = None  # None: the problem's training density
    output_fn: str = _FEATURIZE["output_fn"]
    noise: str = _FEATURIZE["noise"]
    projector: str = _FEATURIZE["projector"]
    kron_dims: str = DEFAULT_KRON_DIMS
    proj_dim: int | None = None
    layers: tuple[str, ...] = DEFAULT_LAYERS
    # None: featurize's default for product rows, grad-dot (identity) for the exact reference
    precondition: str | None = None  # identity | cosine | normalize | trak | adam (exact only)
    lambda_rel: float = _INDEX["lambda_rel"]
    replicates: int = 3
    reference_draws: str = "crn"  # exact only: crn | per-clip

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown variant kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.precondition is None:  # the reference never follows featurize's default
            object.__setattr__(
                self, "precondition", "identity" if self.kind == "exact" else _INDEX["precondition"]
            )
        if self.kind == "exact":
            if self.reference_draws not in REFERENCE_DRAWS:
                raise ValueError(f"reference_draws must be one of {', '.join(REFERENCE_DRAWS)}")
            if self.precondition not in EXACT_PRECONDITIONERS:
                raise ValueError(f"exact variants take {', '.join(EXACT_PRECONDITIONERS)}")
        elif self.precondition == "adam":
            raise ValueError("the adam preconditioner needs full gradients: exact variants only")

    def to_dict(self) -> dict[str, Any]:
        """What the row used. Exact rows say what the reference is (training loss, all parameters,
        unprojected, iid σ ~ p, their draw rule), not featurize's fields they ignore."""
        d = dataclasses.asdict(self)
        if self.kind == "exact":
            for k in _PRODUCT_ONLY:
                d.pop(k)
            d.update(
                output_fn="loss", parameters="all", projection="none", timesteps="iid",
                draw_rule="common draws for all clips (CRN)" if self.reference_draws == "crn"
                else "independent per-clip draws",
            )  # fmt: skip
        else:
            d.pop("reference_draws")
        return d


# -- features ------------------------------------------------------------------------------------
def product_features(problem: LdsProblem, v: Variant, seed: int, clips: Sequence[CachedClip]) -> np.ndarray:
    """(n, D) float64 features of `clips` through the tool's featurizer (projection and draws seeded by
    `seed`; the problem's proposal under stratified-is; through the problem's LoRA adapter when it has
    one, with featurize --lora's default projection unless the variant names its kron dims)."""
    rule = build_draw_rule(
        seed=seed, scheme=v.timesteps, k=v.draws, density=v.density or problem.density, noise=v.noise,
        proposal=problem.proposal if v.timesteps == "stratified-is" else None,
    )  # fmt: skip
    dims = None if v.proj_dim else parse_kron_dims(v.kron_dims)
    lora = problem.lora is not None
    if lora and v.kron_dims == DEFAULT_KRON_DIMS:
        dims = None  # featurize --lora without --kron-dims: the adapter's gradient exact when small
    fz = load_featurizer(
        problem.model, [problem.checkpoint], rule, v.output_fn, problem.device, "float32",
        new_projector=lambda t: build_projector(
            v.projector, t, v.layers, seed, v.proj_dim, "gaussian", dims, lora=lora
        ),
        lora=problem.lora,
    )  # fmt: skip
    out = []
    for i in range(0, len(clips), 8):
        f, _, _ = fz.features([(c.clip_id, c.latent, c.text_emb) for c in clips[i : i + 8]])
        out.append(f.double().numpy())
    return np.concatenate(out)


def _adam_scale(problem: LdsProblem, transformer: torch.nn.Module) -> np.ndarray | None:
    """(P,) 1/(sqrt(v̂)+ε) in `exact_gradients`' order, or None without Adam state."""
    path = problem.adam_moments
    if path is None or not Path(path).exists():
        return None
    v = torch.load(path)
    parts = [
        (1.0 / (v[name].sqrt() + ADAM_EPS)).reshape(-1) if name in v else torch.ones(p.numel())
        for name, p in transformer.named_parameters()
    ]
    return torch.cat(parts).double().numpy()


# -- scores --------------------------------------------------------------------------------------
def score_matrix(train: np.ndarray, query: np.ndarray, kind: str, lambda_rel: float = 1e-2) -> np.ndarray:
    """(n_train, Q) float64 = prepare_train(Φ_train) @ prepare_query(Φ_query)ᵀ (attrib.precondition)."""
    pre = fit_preconditioner(kind, train, dim=train.shape[1], lambda_rel=lambda_rel)
    return pre.prepare_train(train).astype(np.float64) @ pre.prepare_query(query).astype(np.float64).T


def _exact_gram(problem: LdsProblem, v: Variant, seed: int, cache: dict[Any, Any]) -> np.ndarray:
    """(n + Q, n + Q) Gram of the reference gradients of one replicate (adam-scaled for adam)."""
    adam = v.precondition == "adam"
    key = ("exact", v.draws, v.reference_draws, seed, adam)
    if key not in cache:
        if "transformer" not in cache:
            cache["transformer"] = load_transformer(
                problem.model, problem.checkpoint, device=resolve_device(problem.device)
            )
        t = cache["transformer"]
        gkey = ("grads", v.draws, v.reference_draws, seed)
        if gkey not in cache:
            rule = reference_rule(problem.density, v.draws, v.reference_draws, seed)
            cache[gkey] = exact_gradients(t, problem.train + problem.query, rule)  # (n + Q, P)
        scale = _adam_scale(problem, t) if adam else None
        cache[key] = gram(cache[gkey], scale)
    return cache[key]


def variant_scores(problem: LdsProblem, v: Variant, seed: int, cache: dict[Any, Any]) -> np.ndarray:
    """(n_train, Q) scores of one replicate of a variant."""
    train, query = problem.train, problem.query
    if v.kind == "product":
        ft = product_features(problem, v, seed, train)
        fq = product_features(problem, v, seed, query)
        return score_matrix(ft, fq, v.precondition, v.lambda_rel)
    if problem.lora is not None:
        raise ValueError(
            f"{v.name}: the exact reference differentiates every parameter, not a LoRA adapter's"
        )
    K = _exact_gram(problem, v, seed, cache)
    kind = "identity" if v.precondition == "adam" else v.precondition
    alpha = DEFAULT_NORMALIZE_ALPHA if kind == "normalize" else 1.0  # attrib.precondition's α
    return scores_from_gram(K, len(train), kind, lambda_rel=v.lambda_rel, alpha=alpha)


def _row(problem: LdsProblem, v: Variant) -> dict[str, Any]:
    """The variant's fields; through a LoRA adapter, "parameters": "lora" in place of `layers`, and
    kron_dims None where featurize --lora's default projection was used."""
    d = v.to_dict()
    if problem.lora is not None:
        d.pop("layers", None)
        d["parameters"] = "lora"
        if d.get("kron_dims") == DEFAULT_KRON_DIMS:
            d["kron_dims"] = None
    return d


def score_variants(
    problem: LdsProblem, variants: Sequence[Variant], say: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """{variant name: {**variant, lds, query_specific_lds, common_factor_lds, seconds}} on `problem`:
    `lds_summary`s of the LDS and of its query-specific part, and the common-factor LDS
    (`evaluate.lds`); the CI `ci95_subsets` resamples subsets, queries and seeds (`ci95`: queries and
    seeds only)."""
    gt_values, positions = problem.gt_values, problem.positions
    cache: dict[Any, Any] = {}
    out = {}
    for n, v in enumerate(variants, 1):
        t0 = time.monotonic()
        say(
            f"{v.name} (setting {n}/{len(variants)}): {v.replicates} replicate{'s' if v.replicates > 1 else ''}"
        )
        scores = []
        for r in range(v.replicates):  # a line per replicate: a setting can take minutes
            scores.append(variant_scores(problem, v, r, cache))
            if v.replicates > 1:
                done = time.monotonic() - t0
                left = done / (r + 1) * (v.replicates - r - 1)
                say(
                    f"{v.name} (setting {n}/{len(variants)}): replicate {r + 1}/{v.replicates} in {done:.0f} s"
                    + (f", about {left:.0f} s left for this setting" if left else "")
                )
        sums = [subset_sums(s, positions) for s in scores]
        centred = [query_centered(x) for x in sums]
        gt_c = query_centered(gt_values)
        out[v.name] = {
            **_row(problem, v),
            "density": v.density or problem.density,
            "lds": lds_summary(
                [lds_per_query(s, gt_values, positions) for s in scores], sums=sums, gt_values=gt_values
            ),
            "query_specific_lds": lds_summary(
                [lds_from_sums(c, gt_c) for c in centred], sums=centred, gt_values=gt_c
            ),
            "common_factor_lds": float(np.mean([common_factor_lds(x, gt_values) for x in sums])),
            "seconds": round(time.monotonic() - t0, 2),
        }
        s = out[v.name]["lds"]
        say(
            f"{problem.name} {v.name}: LDS {s['mean']:.3f} [{s['ci95_subsets'][0]:.3f}, {s['ci95_subsets'][1]:.3f}]"
        )
    return out


def _exact(
    name: str, draws: int, rule: str = "crn", precondition: str = "identity", reps: int = 1
) -> Variant:
    return Variant(
        name, kind="exact", draws=draws, reference_draws=rule, precondition=precondition, replicates=reps
    )


# Settings `carv-attrib evaluate --variant NAME` knows (K = 8 unless named; exact ones hold the full
# gradient of every parameter of every clip in memory: small models only).
NAMED_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("default"),
        Variant("iid", timesteps="iid"),
        Variant("stratified", timesteps="stratified"),
        Variant("identity", precondition="identity"),
        Variant("cosine", precondition="cosine"),
        Variant("normalize", precondition="normalize"),
        Variant("trak", precondition="trak"),
        Variant("kron-8x8", kron_dims="8x8"),
        Variant("kron-32x32", kron_dims="32x32"),
        Variant("all-linear", layers=("*",)),
        Variant("loss", output_fn="loss"),
        Variant("sqnorm", output_fn="sqnorm"),
        Variant("K4", draws=4),
        Variant("K32", draws=32),
        _exact("exact-crn-8", 8, reps=3),
        _exact("exact-per-clip-8", 8, "per-clip", reps=3),
        _exact("exact-crn-256", 256),
        _exact("exact-per-clip-256", 256, "per-clip"),
        _exact("exact-crn-256-cosine", 256, precondition="cosine"),
        _exact("exact-crn-256-adam", 256, precondition="adam"),
    )
}
