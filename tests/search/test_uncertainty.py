"""The standard errors and top-k probabilities of `search.uncertainty`, against exact values and
simulated estimators; every statistical tolerance is a multiple of the Monte Carlo standard error of
the quantity checked, every float one of float64's epsilon times the sizes involved."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carv_attrib.carv.draws import DrawRule
from carv_attrib.search import uncertainty as unc
from carv_attrib.search.precondition import (
    CosinePreconditioner,
    NormalizePreconditioner,
    Preconditioner,
    fit_preconditioner,
)

EPS64 = np.finfo(np.float64).eps


def _rule(scheme: str, k: int = 8, antithetic: bool = False, noise: str = "shared") -> DrawRule:
    return DrawRule(seed=0, scheme=scheme, k=k, density="uniform", antithetic=antithetic, noise=noise)


def test_iid_basis_is_the_sample_variance_of_the_mean() -> None:
    x = np.random.default_rng(0).normal(size=(5, 8))
    var = unc.standard_error(unc.variance_basis(x, _rule("iid"))) ** 2
    want = x.var(axis=1, ddof=1) / 8
    np.testing.assert_allclose(var, want, rtol=64 * EPS64)


def test_collapsed_strata_pair_adjacent_draws_and_close_an_odd_count_with_a_triple() -> None:
    assert unc.strata_groups(8) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert unc.strata_groups(5) == [slice(0, 2), slice(2, 5)]
    assert unc.strata_groups(3) == [slice(0, 3)]
    x = np.array([[1.0, 3.0, 2.0, 2.0]])
    # (1/K²) Σ_pairs (x_h − x_h')²: pairs (1, 3) and (2, 2)
    var = unc.standard_error(unc.variance_basis(x, _rule("stratified", k=4))) ** 2
    assert var[0] == pytest.approx((1 - 3) ** 2 / 16, rel=16 * EPS64)
    assert unc.degrees_of_freedom(8, _rule("stratified")) == 4
    assert unc.degrees_of_freedom(8, _rule("iid")) == 7
    assert unc.degrees_of_freedom(8, _rule("stratified", antithetic=True)) == 2
    assert unc.degrees_of_freedom(1, _rule("iid", k=1)) == 0


def test_antithetic_pairs_are_one_unit() -> None:
    x = np.array([[1.0, -1.0, 5.0, -5.0]])  # each pair averages to 0: no variance left
    basis = unc.variance_basis(x, _rule("iid", k=4, antithetic=True))
    assert basis.shape == (1, 2)
    assert unc.standard_error(basis)[0] == 0.0


def test_one_draw_has_no_estimate() -> None:
    assert np.isnan(unc.standard_error(unc.variance_basis(np.ones((2, 1)), _rule("iid", k=1)))).all()


def _stratified_estimates(
    rng: np.random.Generator, reps: int, k: int, slope: float
) -> tuple[np.ndarray, np.ndarray]:
    """`reps` stratified estimates of E f(U), f(u) = slope·u + N(0, 1) noise, one uniform per
    stratum: (estimates (reps,), their collapsed-strata variances (reps,))."""
    u = (np.arange(k)[None, :] + rng.random((reps, k))) / k  # (reps, K)
    x = slope * u + rng.normal(size=(reps, k))
    var = unc.standard_error(unc.variance_basis(x, _rule("stratified", k=k))) ** 2
    return x.mean(axis=1), var


@pytest.mark.parametrize("slope", [0.0, 4.0])
def test_collapsed_strata_variance_is_unbiased_without_trend_and_conservative_with_one(slope: float) -> None:
    rng = np.random.default_rng(1)
    reps, k = 20000, 8
    est, var = _stratified_estimates(rng, reps, k, slope)
    true_var = est.var(ddof=1)  # the estimator's actual variance over replicates
    mean_var = var.mean()
    # SE of the mean estimated variance, and of the replicate variance (≈ σ²·√(2/reps) for Gaussians)
    tol = 4 * math.hypot(var.std(ddof=1) / math.sqrt(reps), true_var * math.sqrt(2 / reps))
    if slope == 0.0:
        assert abs(mean_var - true_var) < tol
    else:  # the trend inside each pair of strata is counted as variance: never less than the truth
        assert mean_var > true_var - tol
        assert mean_var - true_var > tol  # and here visibly more (slope² / (12 K³)·K/2 pairs ...)


def test_t_intervals_cover_at_their_level() -> None:
    """Gaussian draws, stratified without trend: score ± t·se covers the mean LEVEL of the time."""
    rng = np.random.default_rng(2)
    reps, k = 20000, 8
    est, var = _stratified_estimates(rng, reps, k, 0.0)
    t = unc.t_quantile(unc.degrees_of_freedom(k, _rule("stratified")))
    center = 0.0  # E f(U) with slope 0
    covered = np.abs(est - center) <= t * np.sqrt(var)
    se = math.sqrt(unc.LEVEL * (1 - unc.LEVEL) / reps)
    assert abs(covered.mean() - unc.LEVEL) < 4 * se


def test_p_top_k_matches_the_normal_probability_of_two_candidates() -> None:
    scores = np.array([1.0, 0.8])
    shared = np.array([[0.1, 0.0], [0.0, 0.15]])  # independent: the gap has sd √(0.1² + 0.15²)
    p = unc.p_top_k(scores, shared, None, k=1, samples=20000)
    want = 0.5 * (1 + math.erf(0.2 / math.hypot(0.1, 0.15) / math.sqrt(2)))
    tol = 4 * math.sqrt(want * (1 - want) / 20000)
    assert abs(p[0] - want) < tol and abs(p[1] - (1 - want)) < tol


def test_common_mode_noise_leaves_the_top_k_settled() -> None:
    """The same draws move every score alike: however large, they cannot reorder the candidates."""
    scores = np.array([1.0, 0.99, 0.98])
    shared = np.tile([[5.0, -3.0, 2.0]], (3, 1))
    np.testing.assert_array_equal(unc.p_top_k(scores, shared, None, k=2), [1.0, 1.0, 0.0])


def _preconditioners(feats: np.ndarray) -> list[Preconditioner]:
    d = feats.shape[1]
    return [
        Preconditioner(d),
        CosinePreconditioner(d),
        NormalizePreconditioner(d, alpha=0.5),
        fit_preconditioner("trak", feats, dim=d),
    ]


@pytest.mark.parametrize("side", ["train", "query"])
def test_linearize_is_the_derivative_of_prepare(side: str) -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 6))
    phi, delta = feats[0], rng.normal(size=(3, 6))
    for pre in _preconditioners(feats):
        prep = pre.prepare_train if side == "train" else pre.prepare_query
        lin = pre.linearize(delta, phi, side)  # (3, 6)
        h = 1e-4  # central differences: error h²·(third derivative) ≈ h² here, rounding ε32/h (float32 out)
        for row, d in zip(lin, delta):
            fd = (
                prep((phi + h * d)[None]).astype(np.float64) - prep((phi - h * d)[None]).astype(np.float64)
            )[0] / (2 * h)
            scale = np.abs(row).max() + 1.0
            tol = 10 * (h**2 + np.finfo(np.float32).eps / h) * scale
            np.testing.assert_allclose(fd, row, atol=tol, err_msg=pre.kind)


def test_raw_from_train_inverts_prepare_train() -> None:
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(40, 6)) * rng.uniform(0.5, 3.0, size=(40, 1))
    for pre in _preconditioners(feats):
        psi = pre.prepare_train(feats[:5]).astype(np.float64)
        back = pre.raw_from_train(psi)
        if pre.kind == "cosine":  # the norm is gone: the unit-norm feature
            np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, rtol=8 * np.finfo(np.float32).eps)
            continue
        # float32 ψ: relative error ~ε32 times the map's condition (trak's inverse: its κ)
        kappa = np.linalg.cond(pre.inverses[0]) if pre.kind == "trak" else 4.0
        np.testing.assert_allclose(
            back, feats[:5], rtol=0, atol=8 * kappa * np.finfo(np.float32).eps * np.abs(feats).max()
        )


def test_the_mirrored_clip_side_is_exact_for_a_clip_that_moves_like_the_query() -> None:
    """A clip whose per-draw features are the query's scaled (φ_ik = c·y_qk) has exactly the mirrored
    clip side: the cheap standard error equals the exact one."""
    rng = np.random.default_rng(5)
    k, d = 8, 6
    y_q = rng.normal(size=(k, d)) + 3.0  # per-draw estimates y_k
    c = 2.5
    for pre in _preconditioners(rng.normal(size=(40, d))):
        dq, phi_q = unc.centred_draws(y_q / k)
        di, phi_i = unc.centred_draws(c * y_q / k)
        psi_q = pre.prepare_query(phi_q[None])[0].astype(np.float64)
        psi_i = pre.prepare_train(phi_i[None]).astype(np.float64)
        mirrored = unc.mirrored_clip_terms(pre, dq, phi_q, psi_i, psi_q)[0]
        exact = unc.clip_terms(pre.linearize(di, phi_i, "train"), psi_q)
        # float32 ψ: ε32 times the terms' scale ‖ψ_q‖·‖J_i δ‖ (cosine's terms cancel to ~0 here), trak's κ
        lin = pre.linearize(di, phi_i, "train")
        kappa = np.linalg.cond(pre.inverses[0]) if pre.kind == "trak" else 1.0
        tol = (
            64 * kappa * np.finfo(np.float32).eps * np.linalg.norm(psi_q) * np.linalg.norm(lin, axis=1).max()
        )
        np.testing.assert_allclose(mirrored, exact, atol=tol, err_msg=pre.kind)
