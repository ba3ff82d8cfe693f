"""search.sketch: the --index-dim sketches are linear, seeded, re-creatable and unbiased."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.search.precondition import fit_preconditioner
from carv_attrib.search.sketch import (
    SKETCH_KINDS,
    Sketch,
    SketchedPreconditioner,
    SketchSpec,
    fwht,
    index_preconditioner,
    sketch_for,
    sketch_from_record,
)


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_fwht_is_the_hadamard_matrix():
    a = np.random.default_rng(0).standard_normal((3, 16))
    np.testing.assert_allclose(fwht(a), a @ _hadamard(16), atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(np.zeros((1, 12)))


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_linear_seeded_and_row_by_row(kind):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 300, 1000))
    sk = Sketch(SketchSpec(kind, 1000, 64, seed=3))
    np.testing.assert_allclose(
        sk.apply(x + 2 * y, np.float64), sk.apply(x, np.float64) + 2 * sk.apply(y, np.float64), atol=1e-9
    )
    # rows are independent: a shard at a time gives the rows of the whole (streaming)
    np.testing.assert_array_equal(sk.apply(x[:7]), sk.apply(x)[:7])
    again = Sketch(SketchSpec(kind, 1000, 64, seed=3))
    np.testing.assert_array_equal(sk.apply(x), again.apply(x))
    assert sk.check() == again.check()
    other = Sketch(SketchSpec(kind, 1000, 64, seed=4))
    assert not np.allclose(sk.apply(x), other.apply(x))
    assert sk.check() != other.check()
    assert sk.apply(x).shape == (300, 64)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_inner_products_are_unbiased(kind):
    """E_S⟨Sa, Sb⟩ = ⟨a, b⟩ and E‖Sa‖² = ‖a‖²: the mean over N seeds lies within 4 standard errors
    (std/√N of the N estimates themselves) of the exact value; the spread is the JL one,
    about ‖a‖‖b‖/√D'."""
    d, d2, n = 300, 32, 2000
    rng = np.random.default_rng(7)
    a = rng.standard_normal(d)
    b = 0.6 * a + rng.standard_normal(d)  # correlated: a non-zero target
    b[:10] *= 20  # a few large coordinates (count-sketch's hard case)
    est, sq = [], []
    for s in range(n):
        y = Sketch(SketchSpec(kind, d, d2, seed=s)).apply(np.stack([a, b]), np.float64)
        est.append(y[0] @ y[1])
        sq.append(y[0] @ y[0])
    for values, exact in ((np.array(est), a @ b), (np.array(sq), a @ a)):
        se = values.std(ddof=1) / np.sqrt(n)
        assert abs(values.mean() - exact) < 4 * se, (values.mean(), exact, se)
    spread = np.std(est) / (np.linalg.norm(a) * np.linalg.norm(b) / np.sqrt(d2))
    assert 0.3 < spread < 2.0, spread


def test_spec_refuses_no_compression_and_unknown_kinds():
    with pytest.raises(ValueError, match="below the feature dim"):
        SketchSpec("srht", 100, 100)
    with pytest.raises(ValueError, match="unknown sketch"):
        SketchSpec("pca", 100, 10)
    assert sketch_for(None, 100) is None and sketch_for(0, 100) is None
    assert sketch_for(10, 100).spec == SketchSpec("srht", 100, 10, 0)


def test_record_recreated_and_mismatches_refused():
    sk = Sketch(SketchSpec("srht", 200, 16, seed=5))
    rec = sk.record()
    assert rec == {"kind": "srht", "dim": 200, "out_dim": 16, "seed": 5, "check": sk.check()}
    x = np.random.default_rng(0).standard_normal((4, 200))
    np.testing.assert_array_equal(sketch_from_record(rec, 200, 16).apply(x), sk.apply(x))
    with pytest.raises(ValueError, match="does not reproduce"):
        sketch_from_record(rec | {"check": "0" * 16})
    with pytest.raises(ValueError, match="takes D = 200"):
        sketch_from_record(rec, dim=300)
    with pytest.raises(ValueError, match="FAISS index holds d = 32"):
        sketch_from_record(rec, 200, index_dim=32)
    pre = fit_preconditioner("normalize", dim=200)
    assert index_preconditioner(None, pre, 200) is pre
    with pytest.raises(ValueError, match="d = 16"):
        index_preconditioner(None, pre, 16)
    assert isinstance(index_preconditioner(rec, pre, 16), SketchedPreconditioner)


@pytest.mark.parametrize("kind", ["identity", "cosine", "normalize"])
def test_sketched_preconditioner_is_s_after_the_preconditioner(kind):
    rng = np.random.default_rng(2)
    base = fit_preconditioner(kind, dim=120, blocks=[60, 60])
    sk = Sketch(SketchSpec("srht", 120, 24, seed=1))
    pre = SketchedPreconditioner(base, sk)
    f = rng.standard_normal((5, 120))
    np.testing.assert_allclose(pre.prepare_train(f), sk.apply(base.prepare_train(f)), rtol=1e-6)
    np.testing.assert_allclose(pre.prepare_query(f), sk.apply(base.prepare_query(f)), rtol=1e-6)
    parts = rng.standard_normal((4, 120))  # explain's per-draw parts still add up to the clip's ψ
    np.testing.assert_allclose(
        pre.prepare_train_parts(parts, parts.sum(0)).sum(0),
        pre.prepare_train(parts.sum(0)[None])[0],
        rtol=1e-5,
        atol=1e-6,
    )
    assert pre.linearize(parts, f[0], "train").shape == (4, 24)
    assert pre.to_dict() == base.to_dict() and pre.kind == kind
    with pytest.raises(ValueError, match="cannot give back raw"):
        pre.raw_from_train(pre.prepare_train(f))
    np.testing.assert_array_equal(pre.with_raw(f).raw_from_train(np.zeros((5, 24))), f)
