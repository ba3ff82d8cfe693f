"""Ranking agreement between two estimator seeds: top-k overlap and Spearman, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from carv_attrib.search.stability import STABLE, is_stable, ranking_agreement


def test_agreement_matches_scipy_and_counts_the_top_k() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 5))
    b = a + 0.3 * rng.standard_normal((30, 5))
    overlap, rho = ranking_agreement(a, b, top_k=10)
    want_rho = np.mean([spearmanr(a[:, q], b[:, q]).statistic for q in range(5)])
    assert rho == pytest.approx(want_rho, abs=1e-12)
    want_overlap = np.mean(
        [len(set(np.argsort(-a[:, q])[:10]) & set(np.argsort(-b[:, q])[:10])) / 10 for q in range(5)]
    )
    assert overlap == pytest.approx(want_overlap)


def test_identical_scores_are_stable_and_noise_is_not() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 3))
    assert ranking_agreement(a, a) == (1.0, 1.0) and is_stable(1.0, 1.0)
    overlap, rho = ranking_agreement(a, rng.standard_normal((40, 3)))
    assert not is_stable(overlap, rho)


def test_masked_entries_are_left_out() -> None:
    a = np.arange(12, dtype=float).reshape(6, 2)
    b = a.copy()
    a[5, 0] = b[5, 0] = np.nan  # query 0's own clip
    overlap, rho = ranking_agreement(a, b, top_k=STABLE["top_k"])  # k capped at 5 finite scores
    assert overlap == 1.0 and rho == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        ranking_agreement(a, b[:3])
