"""TRAK's factored (n×n Woodbury) form against the dense inverse: every method, save/load, the form
choice, old dense indexes, and the memory estimate.

Tolerances come from float64 rounding, not hand-set: both forms compute the same map
M = (ΦᵀΦ + λI)⁻¹, ‖M‖ = 1/λ, with condition number κ = (s_max + λ)/λ. A backward-stable solve (and
the Gram/kernel products feeding it) errs by at most ~ m·eps·κ relative to ‖M‖‖x‖, m = max(n, d)
the longest inner dimension, so two such results differ by ≤ TOL_FACTOR · m · eps · κ · ‖x‖/λ
(TOL_FACTOR = 8 covers the two solves and the product rounding); the Gram side (φ = (ΦᵀΦ + λI)ψ)
by ≤ TOL_FACTOR · m · eps · κ · (s_max + λ)‖ψ‖ (the dense form inverts its stored inverse back)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import carv_attrib.search.precondition as P
from carv_attrib.search.precondition import (
    GramAccumulator,
    TrakPreconditioner,
    fit_preconditioner,
    load_preconditioner,
    trak_bytes,
    trak_form,
)

EPS = float(np.finfo(np.float64).eps)
TOL_FACTOR = 8.0


def _features(n: int, d: int, seed: int = 0, spread: float = 6.0) -> np.ndarray:
    """(n, d) float32 with singular values spread over `spread` decades: an ill-conditioned Gram."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(0, -spread / 2, d)  # column scales: eigenvalues over `spread` decades
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


def _bounds(phi: np.ndarray, lam: float) -> tuple[float, float]:
    """(κ, s_max) of ΦᵀΦ + λI for the float64 features."""
    s_max = float(np.linalg.norm(phi.astype(np.float64), 2) ** 2)
    return (s_max + lam) / lam, s_max


def _assert_rows_close(a: np.ndarray, b: np.ndarray, tol_per_unit: float, x: np.ndarray) -> None:
    """‖a_i − b_i‖ ≤ tol_per_unit · ‖x_i‖ row by row (x: the rows that were mapped)."""
    err = np.linalg.norm(a - b, axis=1)
    bound = tol_per_unit * np.linalg.norm(x, axis=1)
    worst = float(np.max(err / np.maximum(bound, 1e-300)))
    assert worst <= 1.0, f"error {worst:.3g}× the rounding bound"


def _pair(
    phi: np.ndarray, blocks: list[int], lambda_rel: float
) -> tuple[TrakPreconditioner, TrakPreconditioner]:
    d = phi.shape[1]
    dense = fit_preconditioner("trak", phi, dim=d, blocks=blocks, lambda_rel=lambda_rel, form="dense")
    fact = fit_preconditioner("trak", phi, dim=d, blocks=blocks, lambda_rel=lambda_rel, form="factored")
    assert dense.forms == ["dense"] * len(blocks) and fact.forms == ["factored"] * len(blocks)
    assert fact.lambdas == pytest.approx(dense.lambdas, rel=4 * phi.size * EPS)
    return dense, fact


@pytest.mark.parametrize(
    ("n", "d", "blocks", "lambda_rel"),
    [(40, 300, [300], 1e-2), (40, 300, [200, 100], 1e-4), (25, 120, [120], 1e-6)],
)
def test_factored_form_equals_the_dense_one_in_every_method(n, d, blocks, lambda_rel) -> None:
    phi = _features(n, d)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, d))
    parts = rng.standard_normal((3, d))
    dense, fact = _pair(phi, blocks, lambda_rel)
    sl = P._block_slices(blocks)
    for b, s in enumerate(sl):
        lam = dense.lambdas[b]
        kappa, s_max = _bounds(phi[:, s], lam)
        m = max(n, blocks[b])
        tol = TOL_FACTOR * m * EPS * kappa / lam  # per unit ‖x‖ of the mapped rows
        x64 = phi[:, s].astype(np.float64)
        # prepare_train (float32 out: the float32 rounding of either result on top)
        a, c = dense.prepare_train(phi)[:, s], fact.prepare_train(phi)[:, s]
        f32 = float(np.finfo(np.float32).eps) * np.linalg.norm(a, axis=1, keepdims=True)
        assert np.all(
            np.linalg.norm(a - c, axis=1)
            <= tol * np.linalg.norm(x64, axis=1) + 2 * f32.ravel() * np.sqrt(blocks[b])
        )
        # the float64 maps
        _assert_rows_close(
            dense.prepare_train_parts(parts, parts.sum(0))[:, s],
            fact.prepare_train_parts(parts, parts.sum(0))[:, s], tol, parts[:, s],
        )  # fmt: skip
        _assert_rows_close(
            dense.linearize(parts, phi[0], "train")[:, s],
            fact.linearize(parts, phi[0], "train")[:, s],
            tol,
            parts[:, s],
        )
        np.testing.assert_array_equal(fact.linearize(parts, phi[0], "query"), parts)  # queries raw
        _assert_rows_close(
            dense.raw_from_train(q)[:, s], fact.raw_from_train(q)[:, s], tol * lam * (s_max + lam), q[:, s]
        )
        # the inverse itself, entrywise ≤ the bound for a unit vector
        assert np.abs(dense.inverses[b] - fact.inverses[b]).max() <= tol
        # raw_from_train inverts prepare_train (the factored one: to the same rounding bound)
        psi = fact.prepare_train_parts(q, q.sum(0))
        _assert_rows_close(fact.raw_from_train(psi)[:, s], q[:, s], TOL_FACTOR * m * EPS * kappa, q[:, s])
    # scores: the query's dot product with ψ, the sum over blocks
    np.testing.assert_allclose(
        q @ fact.prepare_train_parts(phi, phi.sum(0)).T, q @ dense.prepare_train_parts(phi, phi.sum(0)).T,
        atol=TOL_FACTOR * max(n, d) * EPS * max(_bounds(phi[:, s], lam)[0] / lam for s, lam in zip(sl, dense.lambdas))
        * np.linalg.norm(q, axis=1).max() * np.linalg.norm(phi, axis=1).max(),
    )  # fmt: skip


def test_rank_deficient_features_keep_only_the_nonzero_eigenvalues() -> None:
    base = _features(10, 200, seed=3, spread=2.0)
    phi = np.concatenate([base, base, base[:5] * 2])  # 25 rows of rank 10
    dense, fact = _pair(phi, [200], 1e-3)
    assert fact.to_dict()["ranks"] == [10] and fact.factors[0].wt.shape == (10, 200)
    lam = dense.lambdas[0]
    kappa, _ = _bounds(phi, lam)
    tol = TOL_FACTOR * 200 * EPS * kappa / lam
    assert np.abs(dense.inverses[0] - fact.inverses[0]).max() <= tol


def test_the_form_is_chosen_from_n_and_d(monkeypatch) -> None:
    assert trak_form(2048, 76_800) == "factored" and trak_form(256, 5_120) == "factored"
    assert trak_form(10_000, 5_120) == "dense" and trak_form(10, P.DENSE_MAX_DIM) == "dense"
    assert trak_form(10, 64, "factored") == "factored" and trak_form(10**6, 64, "dense") == "dense"
    with pytest.raises(ValueError, match="trak form"):
        trak_form(1, 1, "sparse")
    monkeypatch.setattr(P, "DENSE_MAX_DIM", 16)
    phi = _features(30, 48, seed=2)
    one = fit_preconditioner("trak", phi, dim=48, blocks=[12, 36], lambda_rel=0.1)
    assert one.forms == ["dense", "factored"]  # 12 ≤ DENSE_MAX_DIM; 30 clips < 36 dims
    more_phi = np.concatenate([phi, phi[:10]])
    more = fit_preconditioner("trak", more_phi, dim=48, blocks=[12, 36])
    assert more.forms == ["dense", "dense"]  # 40 clips ≥ 36 dims
    # streamed without a row count: rows kept until there are d_b of them, then the Gram
    acc = GramAccumulator(48, blocks=[12, 36])
    for chunk in np.array_split(more_phi, 8):
        acc.update(chunk)
    assert acc._rows[1] is None and acc._grams[1] is not None
    np.testing.assert_array_equal(
        acc.finalize(0.01).prepare_train(phi), _one_shot(more_phi, [12, 36]).prepare_train(phi)
    )
    streamed = fit_preconditioner(
        "trak", iter(np.array_split(phi, 5)), dim=48, blocks=[12, 36], lambda_rel=0.1
    )
    assert streamed.forms == ["dense", "factored"]
    np.testing.assert_allclose(
        streamed.prepare_train(phi),
        one.prepare_train(phi),
        rtol=0,
        atol=1e-5 * np.abs(one.prepare_train(phi)).max(),
    )
    with_count = fit_preconditioner(
        "trak", iter(np.array_split(phi, 5)), dim=48, blocks=[12, 36], lambda_rel=0.1, num_rows=30
    )
    np.testing.assert_array_equal(with_count.prepare_train(phi), streamed.prepare_train(phi))


def _one_shot(phi: np.ndarray, blocks: list[int]) -> TrakPreconditioner:
    acc = GramAccumulator(phi.shape[1], blocks)
    acc.update(phi)
    return acc.finalize(0.01)


def test_factored_save_load_round_trip_and_index_info_fields(tmp_path) -> None:
    phi = _features(20, 90)
    pre = fit_preconditioner("trak", phi, dim=90, blocks=[60, 30], lambda_rel=0.05, form="factored")
    pre.save(tmp_path / "pre")
    names = sorted(p.name for p in (tmp_path / "pre").iterdir())
    assert names == [
        "precondition.json", "trak_eigvals_0.npy", "trak_eigvals_1.npy", "trak_factor_0.npy", "trak_factor_1.npy"
    ]  # fmt: skip
    meta = json.loads((tmp_path / "pre" / "precondition.json").read_text())
    assert meta["forms"] == ["factored", "factored"] and meta["ranks"] == [20, 20]
    again = load_preconditioner(tmp_path / "pre")
    assert again.to_dict() == pre.to_dict()
    np.testing.assert_array_equal(again.prepare_train(phi), pre.prepare_train(phi))
    np.testing.assert_array_equal(again.raw_from_train(phi), pre.raw_from_train(phi))
    assert pre.nbytes == 8 * 20 * 90 + 8 * 40 == trak_bytes(20, [60, 30], "factored")["stored"]


def test_an_old_dense_preconditioner_still_loads_and_scores_identically(tmp_path) -> None:
    """Saved before the factored form: no "forms"/"ranks" in its meta, one trak_inverse per block."""
    phi = _features(50, 8, spread=1.0)
    pre = fit_preconditioner("trak", phi, dim=8, blocks=[5, 3], lambda_rel=0.1)
    d = tmp_path / "old"
    d.mkdir()
    for b, inv in enumerate(pre.inverses):
        np.save(d / f"trak_inverse_{b}.npy", inv)
    old_meta = {k: v for k, v in pre.to_dict().items() if k not in ("forms", "ranks")}
    (d / "precondition.json").write_text(json.dumps(old_meta))
    again = load_preconditioner(d)
    assert again.forms == ["dense", "dense"]
    for method in ("prepare_train", "raw_from_train"):
        np.testing.assert_array_equal(getattr(again, method)(phi), getattr(pre, method)(phi))
    np.testing.assert_array_equal(
        again.prepare_train_parts(phi, phi.sum(0)), pre.prepare_train_parts(phi, phi.sum(0))
    )


def test_factored_needs_a_positive_lambda() -> None:
    with pytest.raises(ValueError, match="singular"):
        fit_preconditioner("trak", _features(5, 40), dim=40, lambda_rel=0.0, form="factored")


def test_memory_estimate_picks_the_smaller_form() -> None:
    real = trak_bytes(2048, [76_800])
    assert real["forms"] == ["factored"]
    assert real["stored"] == 8 * 2048 * 76_800 + 8 * 2048  # 1.2 GiB, not 44 GiB
    assert trak_bytes(2048, [76_800], "dense")["stored"] == 8 * 76_800**2
    two = trak_bytes(100, [3000, 10])
    assert two["forms"] == ["factored", "dense"]
    assert two["fit_peak"] >= 8 * 100 * 3000 and two["stored"] == 8 * 100 * 3000 + 800 + 800


def test_a_factored_accumulator_is_finalized_once() -> None:
    acc = GramAccumulator(40, capacity=5, form="factored")
    acc.update(_features(5, 40))
    acc.finalize(0.1)
    with pytest.raises(ValueError, match="already finalized"):
        acc.finalize(0.1)
    with pytest.raises(ValueError, match="after finalize"):
        acc.update(_features(2, 40))
