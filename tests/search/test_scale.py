"""A score's place among the query's scores over the run: exact, sampled (within its standard error)."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.search.scale import EXACT_MAX, SAMPLE, RunScale, run_scales, sample_ids


def test_exact_percentile_and_z_are_the_brute_force_ones() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    scale = RunScale.from_scores(scores, "exact", 500)
    for s in scores[:20]:
        pct, z = scale.place(float(s))
        assert pct * 500 == pytest.approx(100.0 * np.sum(scores <= s), rel=4 * np.finfo(np.float64).eps)
        # mean/sd of 500 float64 values: their rounding is ~500 ulp at most
        assert z == pytest.approx((s - scores.mean()) / scores.std(), rel=500 * np.finfo(np.float64).eps)
    assert scale.place(float(scores.max()))[0] == 100.0
    assert scale.to_json()["percentile_se"] == 0.0


def test_a_clip_of_the_scale_is_placed_by_its_own_score() -> None:
    """A float32 search score just below the float64 one must not push the clip below itself."""
    scores = np.array([0.1, 0.2, 0.30000001, 0.4])
    scale = RunScale.from_scores(scores, "exact", 4, ids=np.array([7, 8, 9, 10]))
    s32 = float(np.float32(0.30000001)) - 1e-7
    assert scale.place(s32)[0] == 50.0  # by the value alone it falls below itself
    assert scale.place(s32, clip_id=9)[0] == 75.0


def test_equal_scores_give_no_z() -> None:
    scale = RunScale.from_scores(np.ones(10), "exact", 10)
    assert scale.place(1.0) == (100.0, None)


def test_a_sampled_percentile_lies_within_its_standard_error() -> None:
    n_run, d = 3 * EXACT_MAX, 8
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(n_run, d))
    psi = rng.normal(size=(2, d))
    ids = sample_ids(n_run, seed=0)
    assert len(ids) == SAMPLE and np.all(np.diff(ids) > 0)
    scales = run_scales(psi, ids, lambda c: vectors[c], n_run)
    exact = vectors @ psi.T  # (n_run, 2)
    for j, scale in enumerate(scales):
        assert scale.method == "sample" and scale.n_run == n_run
        se = scale.percentile_se()
        assert se == pytest.approx(50.0 / np.sqrt(SAMPLE))
        for s in np.quantile(exact[:, j], [0.5, 0.9, 0.99]):
            true = 100.0 * np.mean(exact[:, j] <= s)
            assert abs(scale.place(float(s))[0] - true) < 4 * se  # 4 SE: fails ~1e-4 of seeds at most


def test_small_runs_are_scored_whole() -> None:
    assert np.array_equal(sample_ids(100), np.arange(100))
    scales = run_scales(np.ones((1, 2)), np.arange(3), lambda c: np.eye(3, 2)[c], 3)
    assert scales[0].method == "exact" and scales[0].to_json()["scores"] == 3


def test_placing_many_equals_placing_each() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=300)
    ids = np.arange(300, dtype=np.int64) * 7
    scale = RunScale.from_scores(scores, "exact", 300, ids=ids)
    pct, z = scale.place_many(scores[:50], ids[:50])
    assert z is not None
    for j in range(50):
        assert (pct[j], z[j]) == scale.place(float(scores[j]), int(ids[j]))


def test_without_own_scores_a_result_is_placed_by_its_displayed_score() -> None:
    vectors = np.eye(4)
    scales = run_scales(
        np.array([[4.0, 3.0, 2.0, 1.0]]), np.arange(4), lambda c: vectors[c], 4, keep_own=False
    )
    assert scales[0].own is None
    assert scales[0].place(2.5, clip_id=0)[0] == 50.0  # not 100: the recomputed 4.0 is not used
