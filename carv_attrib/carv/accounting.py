"""Compute-aware variance accounting: is K draws per encode worth it, and which K? (ARCHITECTURE §2)

An estimate made from R encodes with K draws each costs and varies as

    cost(R, K) = R·c_enc + R·K·c_draw
    Var(R, K)  ≈ σ_b²/R + σ_w²/(R·K)

with σ_b² the between-encode variance (0 for mode latents: the encode is deterministic) and σ_w² the
within-encode variance of one draw under the scheme (iid, stratified, stratified-is, so σ_w² is the
scheme's variance per draw, K·Var of its K-draw mean). Var·cost is what a fixed compute budget buys:

    Var·cost = (σ_b² + σ_w²/K)·(c_enc + K·c_draw)         (R cancels)
    ECM      = (Var_base·Cost_base) / (Var_method·Cost_method)
    baseline = a fresh encode per draw, iid σ, K = 1:  Var·cost = (σ_b² + σ_w,iid²)·(c_enc + c_draw)

ECM = 3 means the method reaches the baseline's variance with a third of its compute.

Usage:

    >>> costs = Costs(c_enc=6.0, c_draw=0.4)
    >>> base = VarianceComponents(between=0.0, within=1.0)          # iid
    >>> carv = VarianceComponents(between=0.0, within=0.2)          # stratified-is, per draw
    >>> k = optimal_k(costs, carv, k_max=64); ecm(k, costs, carv, base), ecm_limit(costs, carv, base)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    """Seconds (or any unit) per encode, c_enc, and per (σ, ε) draw forward+backward, c_draw."""

    c_enc: float
    c_draw: float

    def __post_init__(self) -> None:
        if not (self.c_enc >= 0 and self.c_draw >= 0):
            raise ValueError(f"costs must be nonnegative, got c_enc={self.c_enc}, c_draw={self.c_draw}")


@dataclass(frozen=True)
class VarianceComponents:
    """σ_b² (between encodes) and σ_w² (within an encode, per draw of the scheme)."""

    between: float
    within: float

    def __post_init__(self) -> None:
        if not (self.between >= 0 and self.within >= 0):
            raise ValueError(f"variances must be nonnegative, got {self.between}, {self.within}")


def variance(r: int, k: int, comps: VarianceComponents) -> float:
    """Var ≈ σ_b²/R + σ_w²/(R·K)."""
    return comps.between / r + comps.within / (r * k)


def cost(r: int, k: int, costs: Costs) -> float:
    """cost = R·c_enc + R·K·c_draw."""
    return r * costs.c_enc + r * k * costs.c_draw


def ecm(
    k: int,
    costs: Costs,
    method: VarianceComponents,
    baseline: VarianceComponents,
    r: int = 1,
) -> float:
    """ECM = (Var_base·Cost_base)/(Var_method·Cost_method) of R encodes × K draws against the baseline.

    `baseline` holds σ_b² and the iid per-draw σ_w,iid²; the baseline pays c_enc + c_draw per draw.
    R cancels in the ratio; it is a parameter so the formula reads as written.
    """
    base = variance(1, 1, baseline) * cost(1, 1, costs)
    meth = variance(r, k, method) * cost(r, k, costs)
    if meth == 0:
        return math.inf if base > 0 else 1.0
    return base / meth


def ecm_limit(costs: Costs, method: VarianceComponents, baseline: VarianceComponents) -> float:
    """lim_{K→∞} ECM: (σ_b² + σ_w,iid²)(c_enc + c_draw) / (σ_w²·c_draw) when σ_b² = 0, else 0.

    With σ_b² = 0 (mode latents), Var·cost = σ_w²·(c_enc/K + c_draw) decreases in K towards σ_w²·c_draw:
    the encode is fully amortised. With σ_b² > 0 the σ_b²·K·c_draw term grows without bound.
    """
    if method.between > 0:
        return 0.0
    base = variance(1, 1, baseline) * cost(1, 1, costs)
    floor = method.within * costs.c_draw
    return math.inf if floor == 0 else base / floor


def optimal_k(costs: Costs, comps: VarianceComponents, k_max: int = 1024) -> int:
    """The integer K in [1, k_max] minimising Var·cost = (σ_b² + σ_w²/K)(c_enc + K·c_draw).

    Var·cost = const + σ_b²·c_draw·K + σ_w²·c_enc/K is convex in K with continuous minimum
    K* = sqrt(σ_w²·c_enc / (σ_b²·c_draw)); the best integer is ⌊K*⌋ or ⌈K*⌉, clipped to [1, k_max].
    With σ_b² = 0 (or c_draw = 0) it decreases in K, so K = k_max; see `ecm_limit` for the limit.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be at least 1, got {k_max}")
    k_star = k_continuous(costs, comps)
    if math.isinf(k_star):
        return k_max
    candidates = {min(max(c, 1), k_max) for c in (math.floor(k_star), math.ceil(k_star))}

    def var_cost(k: int) -> float:
        return variance(1, k, comps) * cost(1, k, costs)

    return min(sorted(candidates), key=var_cost)  # sorted: ties go to the smaller K


def k_continuous(costs: Costs, comps: VarianceComponents) -> float:
    """K* = sqrt(σ_w²·c_enc / (σ_b²·c_draw)); inf when σ_b²·c_draw = 0 (more draws always help)."""
    num = comps.within * costs.c_enc
    den = comps.between * costs.c_draw
    if den == 0:
        return math.inf if num > 0 else 1.0
    return math.sqrt(num / den)
