"""The next strata: draws that extend a rule's K draws to 2K, 4K, ... without discarding any.

A stratified rule's draw k lies in stratum k of K equal-mass bands of its stratum density (p, or the
proposal q under stratified-is): u_k = (k + U_k)/K, σ_k = F⁻¹(u_k). Halve every stratum: each draw
lies in one half, uniformly within it given which; one new draw, uniform in the *other* half, makes
the 2K draws a stratified sample with one draw in each of 2K equal-mass strata (the halves are
independent given the split). Level ℓ ≥ 1 adds K·2^(ℓ−1) draws this way; after level L the K·2^L
draws are exactly a stratified design at K·2^L strata, the estimator (1/M) Σ_d w_d f(σ_d) stays
unbiased with the same weights w = p/q, and the collapsed-strata variance (`search.uncertainty`)
pairs each draw with its sibling half. Under iid draws a level just adds K·2^(ℓ−1) iid draws.

New draws take their uniforms and noise from a seed derived from (seed, level) (`level_seed`), on the
clip's own stream, so under shared noise every clip and the query get the same new draws (common
random numbers), and draw j of a level is the same in any process. Antithetic rules are not extended
(their pairs would straddle the new strata): `check_extendable` refuses them.

    sigma, w, eps, u = level_draws(rule, stream, level=1, shape=latent.shape)   # (K,), (K,), (K, ...), (K,)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.rng import noise, uniforms
from carv_attrib.carv.timesteps import density, sampler


def check_extendable(rule: DrawRule) -> None:
    """ValueError for a rule whose draws cannot be extended (antithetic pairs)."""
    if rule.antithetic:
        raise ValueError(
            "antithetic draws cannot be extended to finer strata (a pair would straddle the new strata); "
            "--refine needs an index featurized without --antithetic"
        )


def level_seed(rule: DrawRule, level: int) -> int:
    """The seed of level ℓ ≥ 1's new uniforms and noise: SHA-256 of (seed, ℓ), 31 bits."""
    digest = hashlib.sha256(f"carv-nested/{int(rule.seed)}/{int(level)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def level_size(rule: DrawRule, level: int) -> int:
    """Draws level ℓ holds: K at level 0, K·2^(ℓ−1) new ones at ℓ ≥ 1."""
    return int(rule.k) if level == 0 else int(rule.k) * 2 ** (level - 1)


def _uniforms(rule: DrawRule, stream: int, level: int) -> np.ndarray:
    """(level_size,) float64 u ∈ [0, 1) of level ℓ's draws (recursively: a level's new draws are placed
    in the empty halves of the strata its predecessors fill)."""
    k = int(rule.k)
    if level == 0:
        U = uniforms(rule.seed, stream, range(k)).numpy()
        return (np.arange(k) + U) / k if sampler(rule.scheme).stratified else U
    m = level_size(rule, level)
    V = uniforms(level_seed(rule, level), stream, range(m)).numpy()
    if not sampler(rule.scheme).stratified:
        return V
    old = np.sort(np.concatenate([_uniforms(rule, stream, j) for j in range(level)]))  # (m,): one per stratum
    n_old = k * 2 ** (level - 1)  # strata before the split
    j = np.floor(old * n_old).astype(np.int64)  # the stratum of each existing draw
    if not np.array_equal(j, np.arange(n_old)):
        raise AssertionError("nested draws must fill every stratum once")  # by construction
    half = np.floor(old * 2 * n_old).astype(np.int64) - 2 * j  # 0 or 1: the half it lies in
    return (2 * j + (1 - half) + V) / (2 * n_old)


def level_draws(
    rule: DrawRule,
    stream: int,
    level: int,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, np.ndarray]:
    """(σ (m,), w (m,) float64 CPU, ε (m, *shape) in dtype on device, u (m,) float64) of level ℓ's m
    draws (`level_size`); level 0 is the rule's own K draws (`DrawRule.draws_for`). ValueError for an
    antithetic rule or a negative level."""
    check_extendable(rule)
    if level < 0:
        raise ValueError(f"level {level}: must be >= 0")
    u = _uniforms(rule, stream, level)
    if level == 0:
        sigma, w, eps = rule.draws_for(stream, shape, dtype=dtype, device=device)
        return sigma, w, eps, u
    s = sampler(rule.scheme)
    dist = s.stratum_density(density(rule.density), rule.proposal)
    sigma = dist.icdf(torch.from_numpy(u)).to(torch.float64)
    if s.takes_proposal and rule.proposal is not None:
        w = rule.proposal.weight(sigma).to(torch.float64)
    else:
        w = torch.ones_like(sigma)
    eps = noise(level_seed(rule, level), stream, range(len(u)), shape, dtype=dtype, device=device)
    return sigma, w, eps, u


def finest_order(rule: DrawRule, us: Sequence[np.ndarray]) -> np.ndarray:
    """The permutation that puts draws (levels' u concatenated) in stratum order at the finest level,
    so that `uncertainty.variance_basis` pairs each draw with its sibling half; identity under iid."""
    u = np.concatenate(list(us))
    return np.argsort(u, kind="stable") if sampler(rule.scheme).stratified else np.arange(u.size)
