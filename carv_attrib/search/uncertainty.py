"""How sure is a score? Its Monte Carlo standard error and the probability it belongs in the top-k.

A score is s = ⟨ψ_q, ψ_i⟩ with ψ = P(φ̂) (the preconditioner, `search.precondition`) of the CARV
feature φ̂ = (1/K) Σ_k y_k, y_k = w_k φ_k the k-th draw's weighted projected gradient
(`Featurizer.draw_parts` gives y_k / K). To first order (the delta method, the preconditioner's
Jacobian J at the clip's own φ̂: `Preconditioner.linearize`),

    s − E s ≈ (1/K) Σ_k x_k,    x_k = ⟨J_q (y^q_k − φ̂_q), ψ_i⟩ + ⟨ψ_q, J_i (y^i_k − φ̂_i)⟩,

one term per draw, and under common random numbers the query's and the clip's k-th terms come from
the same (σ_k, ε_k). The variance of that mean is estimated the way its draw scheme was drawn:

* iid draws: the sample variance of the x_k over K (`Var = s²/K`);
* stratified draws (one draw per equal-mass stratum; `stratified`, `stratified-is`): the collapsed
  strata estimator (Cochran, *Sampling Techniques*, 3rd ed., §5A.12): adjacent strata are paired
  (a triple closes an odd K) and Var = (1/K²) Σ_G |G|/(|G|−1) Σ_{h∈G} (x_h − x̄_G)². It is
  conservative: it also counts the difference between the two strata's means;
* antithetic draws (ε, −ε at draws 2j, 2j+1) are one unit: their mean enters the formulas above.

`variance_basis` returns vectors e (…, U) with Σ_u e_u² = that variance, so that s + Σ_u z_u e_u with
one z ~ N(0, I_U) shared by all clips of a query is a Gaussian with the estimated variances *and* the
clips' covariance through the draws they share: `p_top_k` simulates the top-k from it.

Modes (`SE_METHODS`):
* "exact": both sides' per-draw terms (the query's, and the clip's recomputed from its cached latent:
  one K-draw backward per clip, as `--explain` spends anyway);
* "cheap" (the default): the query's side exactly (one K-draw backward per query, the clips' ψ_i from
  the index) and the clip's side *mirrored* (`mirrored_clip_terms`): the clip's draws taken to move
  like the query's, scaled to the clip's norm and put through the clip's own Jacobian;
* "refined": `score --refine` (`search.refine`).
Coverage of each against K = 256 draws is measured by bench/score_se.py (README, "How sure a score is").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import sampler

SE_METHODS = ("cheap", "exact", "refined")  # "refined": score --refine (`search.refine`)
CLIP_SIDES = (
    "mirrored",
    "recomputed",
    "mixed",
)  # mixed: --refine's level 0 mirrored, the next strata recomputed
LEVEL = 0.9  # the interval README and the report draw: score ± t·se, two-sided 90 %
Z_LEVEL = 1.6448536269514722  # Φ⁻¹(0.95), the t quantile's limit
# Student-t 0.95 quantiles t_{0.95, ν} for ν = 1..30 (any statistics table, e.g. NIST/SEMATECH
# e-Handbook §1.3.6.7.2): a variance from K = 8 stratified draws has only 4 degrees of freedom, so a
# normal quantile would give ~82 % intervals, not 90 %.
T_95 = (
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
    1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
    1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
)  # fmt: skip
P_TOP_K_SAMPLES = 4000  # simulated top-k draws: the probability's own SE ≤ 0.5/√4000 < 0.008
P_TOP_K_SEED = 0x70C  # fixed: one JSON per input


def units(x: np.ndarray, rule: DrawRule) -> np.ndarray:
    """(…, U) the independent units of per-draw values x (…, K): x itself, or under antithetic
    draws the mean of each pair (2j, 2j+1) (an odd last draw is a unit of its own)."""
    x = np.asarray(x, dtype=np.float64)
    if not rule.antithetic or x.shape[-1] < 2:
        return x
    k = x.shape[-1]
    pairs = 0.5 * (x[..., 0 : k - 1 : 2] + x[..., 1:k:2])  # (…, K//2)
    return np.concatenate([pairs, x[..., k - 1 :]], axis=-1) if k % 2 else pairs


def strata_groups(n_units: int) -> list[slice]:
    """The collapsed strata: adjacent units paired, the last group a triple when n_units is odd;
    one unit is a group of one (no variance estimate)."""
    if n_units < 2:
        return [slice(0, n_units)]
    starts = list(range(0, n_units - (3 if n_units % 2 else 2) + 1, 2))
    return [slice(a, a + 2) for a in starts[:-1]] + [slice(starts[-1], n_units)]


def degrees_of_freedom(k: int, rule: DrawRule) -> int:
    """ν of `variance_basis`'s estimate from k draws: U − 1 under iid draws, Σ_G (|G| − 1) (one per
    collapsed pair) under stratified ones; 0 when no estimate exists."""
    n = units(np.zeros((1, k)), rule).shape[-1]
    if n < 2:
        return 0
    if not sampler(rule.scheme).stratified:
        return n - 1
    return sum(g.stop - g.start - 1 for g in strata_groups(n))


def t_quantile(dof: int) -> float:
    """t_{0.95, ν}: the half-width of the two-sided LEVEL interval in standard errors (`T_95`; the
    normal's beyond 30); inf for ν = 0."""
    if dof < 1:
        return float("inf")
    return T_95[dof - 1] if dof <= len(T_95) else Z_LEVEL


def variance_basis(x: np.ndarray, rule: DrawRule) -> np.ndarray:
    """(…, U) float64 vectors e with Σ_u e_u² = the estimated variance of the mean of the per-draw
    values x (…, K) under `rule`'s scheme (module docstring: iid sample variance, collapsed strata,
    antithetic units). NaN where fewer than two units exist (K = 1)."""
    u = units(x, rule)  # (…, U)
    n = u.shape[-1]
    if n < 2:
        return np.full(u.shape, np.nan)
    if not sampler(rule.scheme).stratified:
        return (u - u.mean(axis=-1, keepdims=True)) / np.sqrt(n * (n - 1))
    out = np.empty_like(u)
    for g in strata_groups(n):
        part = u[..., g]
        size = part.shape[-1]
        out[..., g] = (part - part.mean(axis=-1, keepdims=True)) * np.sqrt(size / (size - 1)) / n
    return out


def standard_error(shared: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """(n,) √(Σ_u shared² + Σ_u own²) from `variance_basis` outputs (n, U); NaN where either is."""
    var = (np.asarray(shared, dtype=np.float64) ** 2).sum(axis=-1)
    if own is not None:
        var = var + (np.asarray(own, dtype=np.float64) ** 2).sum(axis=-1)
    return np.sqrt(var)


def centred_draws(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y_k − φ̂ (K, D), φ̂ (D,)) float64 from `Featurizer.draw_parts`' parts (K, D) = y_k / K."""
    parts = np.asarray(parts, dtype=np.float64)
    total = parts.sum(axis=0)  # (D,) = φ̂
    return parts * parts.shape[0] - total, total


def query_terms(dpsi_q: np.ndarray, psi_c: np.ndarray) -> np.ndarray:
    """(n, K) the query side's per-draw terms ⟨J_q(y^q_k − φ̂_q), ψ_i⟩ for n candidate clips:
    `dpsi_q` (K, D) the query's linearised draws, `psi_c` (n, D) the clips' indexed vectors."""
    return np.asarray(psi_c, dtype=np.float64) @ np.asarray(dpsi_q, dtype=np.float64).T


def clip_terms(dpsi_i: np.ndarray, psi_q: np.ndarray) -> np.ndarray:
    """(K,) the clip side's per-draw terms ⟨ψ_q, J_i(y^i_k − φ̂_i)⟩: `dpsi_i` (K, D), ψ_q (D,)."""
    return np.asarray(dpsi_i, dtype=np.float64) @ np.asarray(psi_q, dtype=np.float64)


def mirrored_clip_terms(
    pre: Any, dq: np.ndarray, phi_q: np.ndarray, psi_c: np.ndarray, psi_q: np.ndarray
) -> np.ndarray:
    """(n, K) the clip side's per-draw terms as "cheap" mirrors them: each clip's draws are taken to
    move like the query's, scaled to its own norm, δφ_ik = (‖φ_i‖/‖φ_q‖)(y^q_k − φ̂_q), and put
    through the clip's own Jacobian: ⟨ψ_q, J_i δφ_ik⟩. `pre` the index's preconditioner, `dq` (K, D)
    and `phi_q` (D,) from `centred_draws` of the query, `psi_c` (n, D) the clips' indexed vectors
    (their raw φ_i from `pre.raw_from_train`), `psi_q` (D,) the prepared query."""
    raw = pre.raw_from_train(psi_c)  # (n, D)
    q_norm = float(np.linalg.norm(phi_q)) or 1.0
    out = np.empty((raw.shape[0], dq.shape[0]))
    for i, phi_i in enumerate(raw):
        rho = float(np.linalg.norm(phi_i)) / q_norm
        out[i] = clip_terms(pre.linearize(rho * dq, phi_i, "train"), psi_q)
    return out


def p_top_k(
    scores: np.ndarray,
    shared: np.ndarray,
    own: np.ndarray | None,
    k: int,
    samples: int = P_TOP_K_SAMPLES,
    seed: int = P_TOP_K_SEED,
) -> np.ndarray:
    """(n,) probability that each of n candidates (scores (n,), best first) is in the top k, under
    s + shared·z + own⊙z' with z ~ N(0, I_U) common to all candidates (the draws they share) and
    z' (n, U) independent per candidate (`own`; None when all randomness is shared). Rows of NaN
    (no estimate) are treated as exact. Candidates beyond the n given are assumed to stay below:
    pass more than k (score searches 2k + 10). Monte Carlo with a fixed seed; its own SE ≤ 0.5/√samples."""
    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    if n <= k:
        return np.ones(n)
    sh = np.nan_to_num(np.asarray(shared, dtype=np.float64))  # (n, U)
    rng = np.random.default_rng(seed)
    hits = np.zeros(n)
    batch = 500
    for start in range(0, samples, batch):
        m = min(batch, samples - start)
        z = rng.standard_normal((m, sh.shape[1]))  # (m, U)
        draw = s[None, :] + z @ sh.T  # (m, n)
        if own is not None:
            ow = np.nan_to_num(np.asarray(own, dtype=np.float64))
            draw += np.einsum("mnu,nu->mn", rng.standard_normal((m, n, ow.shape[1])), ow)
        top = np.argpartition(-draw, k - 1, axis=1)[:, :k]  # (m, k)
        np.add.at(hits, top.ravel(), 1.0)
    return hits / samples


def describe(method: str, rule: DrawRule) -> dict[str, Any]:
    """The query's "uncertainty" block: how its results' se and p_top_k were obtained."""
    formula = "collapsed-strata" if sampler(rule.scheme).stratified else "iid"
    dof = degrees_of_freedom(rule.k, rule)
    return {
        "method": method,
        "formula": formula + ("+antithetic-pairs" if rule.antithetic else ""),
        "draws": int(rule.k),
        "dof": dof,
        "level": LEVEL,
        "t": t_quantile(dof) if dof > 0 else None,
        "clip_side": "recomputed" if method != "cheap" else "mirrored",
    }
