"""The `plan` pilot's maths: per-σ gradient moments, the fitted proposal q(σ), within-encode variance
per draw of each timestep scheme, the ECM table, the ranking-stability K and the recommendation.

Pure library code over a loaded `Featurizer` and cached clips; `carv_attrib.pipeline.plan` loads
them, times the encode and writes plan.json. Settings come as a `PilotSettings` (not a CLI config).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from carv_attrib.attrib.featurizer import Featurizer, token_weights
from carv_attrib.attrib.gradients import per_draw_features
from carv_attrib.carv.accounting import Costs, VarianceComponents, ecm, ecm_limit
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.rng import clip_stream, noise, uniforms
from carv_attrib.carv.timesteps import Density, Proposal, density
from carv_attrib.models.wan import pad_context


class CachedClip(Protocol):
    """What the pilot reads of a cached clip (`carv_attrib.store.latents.CachedClip` is one): attrib
    takes clips by shape, not from storage."""

    clip_id: int
    latent: torch.Tensor  # float32 (C, T, h, w), normalised
    text_emb: torch.Tensor  # float32 (L, D)
    motion: torch.Tensor | None  # float32 (T, h, w) or None


StepFn = Callable[[str], None]
"""on_step(name): called after each pilot step ("iid", "ranking K=4", …); the pipeline turns it into
its progress events (attrib does not depend on the pipeline's callback type)."""


def _no_step(name: str) -> None:
    pass


@dataclass(frozen=True)
class PilotSettings:
    """What the pilot measures with.

    density: p(σ) spec; bins: σ bins of the proposal fit; draws_per_bin: draws per bin and clip;
    draws: K of each replicate featurize; replicates: independent seeds per scheme; seed: base seed;
    output_fn: the differentiated output; mix: share of p mixed into q; batch_clips: clips per backward.
    """

    density: str
    bins: int
    draws_per_bin: int
    draws: int
    replicates: int
    seed: int
    output_fn: str
    mix: float
    batch_clips: int = 4

    @classmethod
    def from_config(cls, cfg: Any) -> PilotSettings:
        """The settings of any object with these attributes (a `PlanConfig`)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


PILOT_SCHEMES = (
    ("iid", False),
    ("stratified", False),
    ("stratified-is", False),
    ("iid", True),
    ("stratified-is", True),
)
PILOT_SEED_OFFSET = 7_919  # pilot draws never coincide with featurize's (seed, stream, k) draws


def k_ladder(k_max: int) -> list[int]:
    """The K the ECM table lists and the ranking pilot tries, in order: 1, 2, 4, … ≤ k_max (up to 256)."""
    return [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= k_max] or [k_max]


def scheme_name(scheme: str, antithetic: bool) -> str:
    return scheme + ("+antithetic" if antithetic else "")


def bin_second_moments(
    featurizer: Featurizer, clips: list[CachedClip], cfg: PilotSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(edges (bins+1,), m2 (bins,), seconds per draw): E‖φ‖² of per-draw features in each σ bin.

    In bin b the σ of draw j is F_p⁻¹ at a stratified point of [F_p(e_b), F_p(e_b+1)], so every
    bin is covered whatever p is; ε comes from the counter-based rule under a pilot seed.
    """
    p = density(cfg.density)
    edges = torch.linspace(0, 1, cfg.bins + 1, dtype=torch.float64)
    fe = p.cdf(edges)  # (bins+1,)
    J = cfg.draws_per_bin
    n = cfg.bins * J
    seed = cfg.seed + PILOT_SEED_OFFSET
    sq = torch.zeros(cfg.bins, dtype=torch.float64)
    t0 = time.monotonic()
    for c in clips:
        stream = clip_stream(c.clip_id)
        u = uniforms(seed, stream, range(n)).view(cfg.bins, J)  # (bins, J)
        strata = (torch.arange(J, dtype=torch.float64) + u) / J  # (bins, J) in each bin's [0, 1)
        sigma = p.icdf(fe[:-1, None] + strata * (fe[1:] - fe[:-1])[:, None]).reshape(-1)  # (n,)
        eps = noise(seed, stream, range(n), tuple(c.latent.shape))  # (n, C, T, h, w)
        phi, _ = per_draw_features(
            featurizer.transformers[0],
            featurizer.projectors[0],
            c.latent,
            pad_context(c.text_emb),
            sigma,
            eps,
            cfg.output_fn,
            token_weights(featurizer.objective, c.clip_id, c.motion),
        )  # (n, D)
        sq += phi.double().pow(2).sum(1).view(cfg.bins, J).sum(1)
    seconds = (time.monotonic() - t0) / (len(clips) * n)
    return edges, sq / (len(clips) * J), seconds


def replicate_variance(
    featurizer: Featurizer, clips: list[CachedClip], rule: DrawRule, replicates: int, batch_clips: int = 4
) -> tuple[dict[str, float], list[float]]:
    """Within-encode variance per draw σ_w² = K·mean_clips tr Cov_r of each clip's feature, of the
    raw feature ("raw") and of the stored one ("stored": unit norm, what the default cosine index
    holds and ranks by); "signal" = mean_clips ‖ū_i − ū‖², how far apart the clips' stored features
    are (what a ranking must resolve). Also the seconds per draw of each replicate.

    Replicates r use seeds seed+r with per-clip noise, so they are independent estimates of each
    clip's feature; tr Cov is summed over feature coordinates.
    """
    feats, seconds = [], []  # (R, N, D)
    for r in range(replicates):
        featurizer.use_rule(dataclasses.replace(rule, seed=rule.seed + 1 + r))
        t0 = time.monotonic()
        f = torch.cat(
            [
                featurizer.features(
                    [(c.clip_id, c.latent, c.text_emb, c.motion) for c in clips[i : i + batch_clips]]
                )[0]
                for i in range(0, len(clips), batch_clips)
            ]
        )  # (N, D): B clips x K draws per backward, as featurize does
        seconds.append((time.monotonic() - t0) / (len(clips) * rule.k))
        feats.append(f.double())
    stack = torch.stack(feats)  # (R, N, D)
    unit = stack / stack.norm(dim=2, keepdim=True).clamp_min(1e-300)
    mean_unit = unit.mean(0)  # (N, D)
    return {
        "raw": float(stack.var(dim=0, unbiased=True).sum(dim=1).mean()) * rule.k,
        "stored": float(unit.var(dim=0, unbiased=True).sum(dim=1).mean()) * rule.k,
        "signal": float((mean_unit - mean_unit.mean(0)).pow(2).sum(1).mean()),
    }, seconds


def fit_proposal(
    featurizer: Featurizer, clips: list[CachedClip], cfg: PilotSettings, p: Density
) -> tuple[Proposal, dict[str, Any]]:
    """q ∝ p̄_bin · sqrt(m2_bin) mixed with p (p-scaled form), and the per-bin measurements."""
    edges, m2, _ = bin_second_moments(featurizer, clips, cfg)
    fe = p.cdf(edges)
    p_bar = (fe[1:] - fe[:-1]) / (edges[1:] - edges[:-1])  # (bins,) mean density of p per bin
    proposal = Proposal.from_bins(edges, p_bar * m2.sqrt(), density=p.spec, mix=cfg.mix, form="p-scaled")
    bins = {
        "edges": edges.tolist(),
        "second_moment": m2.tolist(),
        "rms_grad_norm": m2.sqrt().tolist(),
        "p_mean_density": p_bar.tolist(),
    }
    return proposal, bins


def scheme_variances(
    featurizer: Featurizer,
    clips: list[CachedClip],
    cfg: PilotSettings,
    p: Density,
    proposal: Proposal,
    on_step: StepFn = _no_step,
) -> tuple[dict[str, dict[str, float]], float]:
    """Within-encode variances per draw of each scheme (`replicate_variance`), and c_draw: the median
    seconds per draw over every replicate run (stable under a loaded machine)."""
    variances: dict[str, dict[str, float]] = {}
    draw_seconds: list[float] = []
    for scheme, anti in PILOT_SCHEMES:
        rule = DrawRule(
            seed=cfg.seed,
            scheme=scheme,
            k=cfg.draws,
            density=p.spec,
            noise="per-clip",
            antithetic=anti,
            proposal=proposal if scheme == "stratified-is" else None,
        )
        var, sec = replicate_variance(featurizer, clips, rule, cfg.replicates, cfg.batch_clips)
        variances[scheme_name(scheme, anti)] = var
        draw_seconds += sec
        on_step(scheme_name(scheme, anti))
    return variances, statistics.median(draw_seconds)


def ecm_table(variances: dict[str, dict[str, float]], costs: Costs, k_max: int) -> dict[str, Any]:
    """Per scheme: variances per draw and the ECM at each K, both of the stored (attribution) feature."""
    base = VarianceComponents(between=0.0, within=variances["iid"]["stored"])
    ks = k_ladder(k_max)
    table = {}
    for name, v in variances.items():
        var = v["stored"]
        comps = VarianceComponents(between=0.0, within=var)
        table[name] = {
            "within_variance_per_draw": var,
            "raw_within_variance_per_draw": v["raw"],
            "variance_ratio_vs_iid": var / variances["iid"]["stored"],
            "raw_variance_ratio_vs_iid": v["raw"] / variances["iid"]["raw"],
            "ecm": {str(k): ecm(k, costs, comps, base) for k in ks},
            "ecm_limit": ecm_limit(costs, comps, base),
        }
    return table


NOISE_SHARE = 0.1  # the noise rule's K: estimator noise of the stored features ≤ this share of their spread
RANK_SEED_OFFSET = 104_729  # the ranking pilot's two seeds never coincide with featurize's or the pilot's


def ranking_draws(
    featurizer: Featurizer,
    clips: list[CachedClip],
    rule: DrawRule,
    precondition: str,
    k_max: int,
    batch_clips: int = 4,
    on_step: StepFn = _no_step,
) -> dict[str, Any]:
    """The fewest K in 1, 2, 4, … ≤ k_max at which two estimator seeds rank the clips alike.

    Each clip is a query against the others (its own score left out): features under seeds s and s'
    (`rule` otherwise unchanged: scheme, proposal, shared noise as featurize uses them), the index's
    preconditioner, then `attrib.stability.ranking_agreement` (top-k overlap, k = min(10, (n−1)//3),
    and Spearman over the whole ranking). K is stable when `stability.is_stable` holds; the curve up
    to that K is returned, and `stable` False when even k_max is not."""
    from carv_attrib.search.precondition import fit_preconditioner
    from carv_attrib.search.stability import STABLE, is_stable, ranking_agreement

    n = len(clips)
    top_k = max(1, min(STABLE["top_k"], (n - 1) // 3))
    ks = k_ladder(k_max)
    curve = []
    for k in ks:
        scores = []
        for r in (0, 1):
            featurizer.use_rule(dataclasses.replace(rule, k=k, seed=rule.seed + RANK_SEED_OFFSET + r))
            feats = torch.cat(
                [
                    featurizer.features(
                        [(c.clip_id, c.latent, c.text_emb, c.motion) for c in clips[i : i + batch_clips]]
                    )[0]
                    for i in range(0, n, batch_clips)
                ]
            ).double()  # (n, D)
            pre = fit_preconditioner(precondition, feats.numpy(), dim=feats.shape[1])
            s = pre.prepare_train(feats.numpy()).astype("float64") @ pre.prepare_query(feats.numpy()).T
            s[range(n), range(n)] = float("nan")  # a clip is not its own training clip
            scores.append(s)
        overlap, rho = ranking_agreement(scores[0], scores[1], top_k=top_k)
        curve.append({"draws": k, "top_k_overlap": overlap, "spearman": rho})
        on_step(f"ranking K={k}")
        if is_stable(overlap, rho):
            return {"draws": k, "stable": True, "top_k": top_k, "clips": n, "curve": curve, **STABLE_RULE}
    return {"draws": ks[-1], "stable": False, "top_k": top_k, "clips": n, "curve": curve, **STABLE_RULE}


STABLE_RULE = {"rule": "top-k overlap >= 0.9 and Spearman >= 0.95 between two estimator seeds"}


def recommend(
    variances: dict[str, dict[str, float]], costs: Costs, k_max: int, ranking: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The scheme with the lowest stored-feature variance per draw, and K: with `ranking`
    (`ranking_draws` of that scheme), the fewest draws at which two seeds rank alike; without, the
    smallest K at which the noise σ_w²/K is at most NOISE_SHARE of the signal (how far apart the
    clips' stored features are). When k_max is what limits K, `capped` says so."""
    best = min(variances, key=lambda n: (variances[n]["stored"], "antithetic" in n))
    v = variances[best]
    k_noise = max(1, math.ceil(v["stored"] / max(NOISE_SHARE * v["signal"], 1e-300)))
    k_rec = min(k_noise, k_max) if ranking is None else int(ranking["draws"])
    # ECM(K)/ECM_∞ = K·c_draw/(c_enc + K·c_draw): K ≥ 9·c_enc/c_draw reaches 90% of the amortisation limit
    k_amortised = max(1, math.ceil(9 * costs.c_enc / max(costs.c_draw, 1e-12)))
    base = VarianceComponents(between=0.0, within=variances["iid"]["stored"])
    why = "lowest variance per draw of the stored feature; " + (
        f"the fewest draws that bring its noise to {NOISE_SHARE:.0%} of the spread between clips' features"
        if ranking is None
        else f"the fewest draws at which two estimator seeds give the same ranking ({STABLE_RULE['rule']}, "
        f"top-{ranking['top_k']} of {ranking['clips']} clips)"
    )
    return {
        "scheme": best.split("+")[0],
        "antithetic": "antithetic" in best,
        "draws": k_rec,
        "capped": (k_noise > k_max) if ranking is None else not ranking["stable"],
        "draws_noise_share": min(k_noise, k_max),
        "noise_share_at_draws": v["stored"] / k_rec / max(v["signal"], 1e-300),
        "draws_for_90pct_amortisation": k_amortised,
        "ecm": ecm(k_rec, costs, VarianceComponents(0.0, v["stored"]), base),
        "ranking": ranking,
        "why": why,
    }
