"""Preconditioners: TRAK kernel vs a direct float64 solve, blocks, cosine, streaming, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from carv_attrib.search.precondition import (
    CosinePreconditioner,
    GramAccumulator,
    NormalizePreconditioner,
    Preconditioner,
    TrakPreconditioner,
    fit_preconditioner,
    load_preconditioner,
)


@pytest.fixture
def feats() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scale = np.array([3.0, 1.0, 0.5, 2.0, 1.0, 0.1, 4.0, 1.0])  # uneven feature scales
    return (rng.normal(size=(50, 8)) * scale).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)


def _trak_reference(phi: np.ndarray, lambda_rel: float) -> tuple[np.ndarray, float]:
    phi = phi.astype(np.float64)
    gram = phi.T @ phi
    lam = lambda_rel * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi.T).T, lam


def test_trak_equals_direct_solve(feats):
    phi, q = feats
    pre = fit_preconditioner("trak", phi, dim=8, lambda_rel=0.1)
    ref, lam = _trak_reference(phi, 0.1)
    psi = pre.prepare_train(phi)
    assert psi.dtype == np.float32 and psi.shape == phi.shape
    np.testing.assert_allclose(psi, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert pre.lambdas == pytest.approx([lam]) and pre.lambda_rel == 0.1 and pre.num_train == 50
    np.testing.assert_array_equal(pre.prepare_query(q), q)  # queries stay raw


def test_trak_block_diagonal_for_two_checkpoints(feats):
    phi, q = feats
    pre = fit_preconditioner("trak", phi, dim=8, blocks=[5, 3], lambda_rel=0.01)
    psi = pre.prepare_train(phi)
    ref0, lam0 = _trak_reference(phi[:, :5], 0.01)
    ref1, lam1 = _trak_reference(phi[:, 5:], 0.01)
    np.testing.assert_allclose(psi, np.hstack([ref0, ref1]), rtol=1e-5, atol=1e-6)
    assert pre.lambdas == pytest.approx([lam0, lam1])
    # The score is the sum of the per-checkpoint TRAK scores.
    np.testing.assert_allclose(q @ psi.T, q[:, :5] @ ref0.T + q[:, 5:] @ ref1.T, rtol=1e-4, atol=1e-6)


def test_streaming_gram_equals_one_shot(feats):
    phi, _ = feats
    acc = GramAccumulator(8, blocks=[4, 4])
    for chunk in np.array_split(phi, 3):
        acc.update(torch.from_numpy(chunk))  # torch tensors are accepted too
    one = GramAccumulator(8, blocks=[4, 4])
    one.update(phi)
    assert acc.n == one.n == 50
    for a, b in zip(acc.grams, one.grams, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    streamed = fit_preconditioner("trak", iter(np.array_split(phi, 4)), dim=8, lambda_rel=0.1)
    np.testing.assert_allclose(
        streamed.inverses[0], fit_preconditioner("trak", phi, dim=8, lambda_rel=0.1).inverses[0]
    )


def test_cosine_unit_norm_per_block(feats):
    phi, q = feats
    phi = phi.copy()
    phi[3, 5:] = 0.0  # a zero block stays zero instead of NaN
    pre = fit_preconditioner("cosine", dim=8, blocks=[5, 3])
    psi, qq = pre.prepare_train(phi), pre.prepare_query(q)
    norms = np.stack([np.linalg.norm(psi[:, :5], axis=1), np.linalg.norm(psi[:, 5:], axis=1)], 1)
    expected = np.ones_like(norms)
    expected[3, 1] = 0.0
    np.testing.assert_allclose(norms, expected, rtol=1e-6)

    def cos(a, b):
        return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.maximum(np.linalg.norm(b, axis=1), 1e-30))

    np.testing.assert_allclose(
        qq @ psi.T, cos(q[:, :5], phi[:, :5]) + cos(q[:, 5:], phi[:, 5:]), rtol=1e-5, atol=1e-6
    )


def test_identity_is_plain_dot(feats):
    phi, q = feats
    pre = fit_preconditioner("identity", dim=8, blocks=[5, 3])
    np.testing.assert_allclose(pre.prepare_query(q) @ pre.prepare_train(phi).T, q @ phi.T, rtol=1e-6)


def test_non_finite_rows_and_bad_shapes_are_refused(feats):
    phi, _ = feats
    bad = phi.copy()
    bad[7, 2] = np.nan
    bad[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"rows \[7, 9\] contain NaN/Inf"):
        GramAccumulator(8).update(bad)
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_preconditioner("cosine", dim=8).prepare_query(bad)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        GramAccumulator(8).update(phi[:, :6])
    with pytest.raises(ValueError, match="sum to the feature dim"):
        GramAccumulator(8, blocks=[4, 3])
    with pytest.raises(ValueError, match="unknown preconditioner"):
        fit_preconditioner("kfac", phi, dim=8)


def test_singular_gram_needs_lambda():
    phi = np.random.default_rng(1).normal(size=(3, 8))  # n < d: ΦᵀΦ has rank 3
    with pytest.raises(ValueError, match="singular"):
        fit_preconditioner("trak", phi, dim=8, lambda_rel=0.0)
    fit_preconditioner("trak", phi, dim=8, lambda_rel=1e-3)  # fine with λ > 0


@pytest.mark.parametrize("kind", ["identity", "cosine", "normalize", "trak"])
def test_save_load_round_trip(kind, feats, tmp_path):
    phi, q = feats
    pre = fit_preconditioner(kind, phi, dim=8, blocks=[6, 2], lambda_rel=0.2)
    pre.save(tmp_path / "pre")
    again = load_preconditioner(tmp_path / "pre")
    assert type(again) is type(pre) and again.to_dict() == pre.to_dict()
    assert again.to_dict()["kind"] == kind and again.blocks == [6, 2]
    np.testing.assert_array_equal(again.prepare_train(phi), pre.prepare_train(phi))
    np.testing.assert_array_equal(again.prepare_query(q), pre.prepare_query(q))
    assert not list((tmp_path / "pre").glob("*.tmp"))
    expected_cls = {
        "identity": Preconditioner,
        "cosine": CosinePreconditioner,
        "normalize": NormalizePreconditioner,
        "trak": TrakPreconditioner,
    }[kind]
    assert type(again) is expected_cls
    with pytest.raises(FileNotFoundError, match="precondition.json"):
        load_preconditioner(tmp_path / "missing")


def test_trak_lambda_is_relative_to_the_mean_nonzero_eigenvalue_when_n_is_below_d() -> None:
    """n < d: ΦᵀΦ has n non-zero eigenvalues summing to its trace, so their mean is tr/n (not tr/d)."""
    phi = np.random.default_rng(5).normal(size=(3, 8))
    pre = fit_preconditioner("trak", phi, dim=8, lambda_rel=0.1)
    eig = np.linalg.eigvalsh(phi.T @ phi)
    nonzero = eig[eig > eig.max() * 8 * np.finfo(np.float64).eps * 8]  # rank 3 of 8
    assert nonzero.size == 3
    assert pre.lambdas[0] == pytest.approx(0.1 * nonzero.mean(), rel=8 * 8 * np.finfo(np.float64).eps)


def test_unknown_preconditioners_are_refused_when_fitted_and_when_loaded(feats, tmp_path) -> None:
    phi, _ = feats
    with pytest.raises(
        ValueError, match=r"unknown preconditioner 'adam'; expected one of identity, trak, cosine"
    ):
        fit_preconditioner("adam", phi, dim=8)
    pre = fit_preconditioner("identity", phi, dim=8)
    pre.save(tmp_path / "pre")
    meta = tmp_path / "pre" / "precondition.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "kind": "adam"}))
    with pytest.raises(ValueError, match=r"unknown preconditioner 'adam'; expected one of identity, "):
        load_preconditioner(tmp_path / "pre")


def test_normalize_is_the_studys_normalize_and_spans_grad_dot_to_cosine(feats) -> None:
    """ψ = φ/‖φ‖^α, queries unit norm: the scores equal `gradspace.scores_from_gram(…, "normalize")`
    (the LDS study's), α = 1 is cosine and α = 0 grad-dot up to a per-query scale."""
    from carv_attrib.lds.gradspace import scores_from_gram

    phi, q = feats
    both = np.concatenate([phi, q]).astype(np.float64)
    pre = fit_preconditioner("normalize", dim=8)
    assert pre.alpha == 0.5 and pre.to_dict()["alpha"] == 0.5
    tool = pre.prepare_train(phi).astype(np.float64) @ pre.prepare_query(q).astype(np.float64).T  # (50, 4)
    study = scores_from_gram(both @ both.T, len(phi), "normalize", alpha=0.5)
    # float32 rounding of ψ and of the unit query (≤ eps32/2 relative per entry), summed over d = 8 terms
    bound = 8 * float(np.finfo(np.float32).eps) * np.abs(study).max()
    np.testing.assert_allclose(tool, study, rtol=0, atol=bound)
    cos = CosinePreconditioner(8)
    one = NormalizePreconditioner(8, alpha=1.0)
    np.testing.assert_array_equal(one.prepare_train(phi), cos.prepare_train(phi))
    zero = NormalizePreconditioner(8, alpha=0.0)
    raw = phi.astype(np.float64) @ q.astype(np.float64).T / np.linalg.norm(q.astype(np.float64), axis=1)
    got = zero.prepare_train(phi).astype(np.float64) @ zero.prepare_query(q).astype(np.float64).T
    np.testing.assert_allclose(got, raw, rtol=0, atol=8 * float(np.finfo(np.float32).eps) * np.abs(raw).max())
    with pytest.raises(ValueError, match="alpha"):
        NormalizePreconditioner(8, alpha=1.5)
