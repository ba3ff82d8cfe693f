"""lds/metric.py: our LDS equals dattri's on the same inputs; ragged subsets; CIs cover the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carv_attrib.lds.metric import lds_per_query, lds_summary, random_floor


def _problem(seed: int = 0, n: int = 20, q: int = 5, m: int = 30):
    rng = np.random.default_rng(seed)
    positions = np.stack([np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(m)])
    true = rng.normal(size=(n, q))
    gt = true[positions].sum(axis=1) + 0.5 * rng.normal(size=(m, q))  # a noisy linear datamodel
    return true, gt, positions


def test_lds_agrees_with_dattri() -> None:
    from dattri.metric import lds

    scores, gt, positions = _problem()
    ours = lds_per_query(scores, gt, positions)
    theirs, _ = lds(torch.from_numpy(scores), (torch.from_numpy(gt), torch.from_numpy(positions)))
    # Both are Pearson correlations of average ranks of the same M numbers per query: the same
    # float64 arithmetic up to summation order, so agreement to a few ulps of values ≤ 1.
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=16 * np.finfo(np.float64).eps * len(gt))


def test_ragged_positions_equal_the_rectangular_result() -> None:
    scores, gt, positions = _problem(1)
    np.testing.assert_array_equal(
        lds_per_query(scores, gt, positions), lds_per_query(scores, gt, list(positions))
    )


def test_true_scores_beat_random_and_the_ci_is_ordered() -> None:
    scores, gt, positions = _problem(2)
    s = lds_summary([lds_per_query(scores, gt, positions)] * 2)
    floor = random_floor(gt, positions, scores.shape[0])
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    # 30 subsets: the random floor's sd is about 1/sqrt(29); the planted datamodel is far above it
    assert s["mean"] > floor["mean"] + 4 * floor["sd"]
    # the floor's mean over its 20 repeats is 0 up to its standard error
    assert abs(floor["mean"]) < 4 * floor["sd"] / np.sqrt(20)


@pytest.mark.parametrize("reps", [1, 3])
def test_summary_reports_replicate_spread(reps: int) -> None:
    scores, gt, positions = _problem(3)
    per = [lds_per_query(scores + 0.1 * k, gt, positions) for k in range(reps)]
    s = lds_summary(per)
    assert len(s["replicates"]) == reps and (s["se_replicates"] is None) == (reps == 1)


def test_subset_bootstrap_is_wider_when_queries_move_together() -> None:
    """Queries that are copies of one another carry one query's information: resampling queries
    alone gives a CI of width 0, resampling subsets does not."""
    from carv_attrib.lds.metric import LdsBootstrap, subset_sums

    scores, gt, positions = _problem(4, q=1)
    scores, gt = np.repeat(scores, 6, axis=1), np.repeat(gt, 6, axis=1)
    per = lds_per_query(scores, gt, positions)
    s = lds_summary([per], sums=[subset_sums(scores, positions)], gt_values=gt)
    assert s["ci95"][1] - s["ci95"][0] == pytest.approx(0.0, abs=1e-12)
    lo, hi = s["ci95_subsets"]
    assert lo < s["mean"] < hi and hi - lo > 0.05
    # one bootstrap's samples of two settings are paired: a setting against itself has ratio 1
    boot = LdsBootstrap(len(gt), gt.shape[1], n_boot=200)
    a = boot.samples([subset_sums(scores, positions)], gt)
    np.testing.assert_array_equal(a / boot.samples([subset_sums(scores, positions)], gt), np.ones(200))


def test_bootstrap_samples_center_on_the_estimate() -> None:
    from carv_attrib.lds.metric import LdsBootstrap, subset_sums

    scores, gt, positions = _problem(5)
    est = np.nanmean(lds_per_query(scores, gt, positions))
    samples = LdsBootstrap(len(gt), gt.shape[1], n_boot=500).samples([subset_sums(scores, positions)], gt)
    # resampled subsets repeat (ties), which biases Spearman a little: small beside the spread
    assert abs(samples.mean() - est) < samples.std()


def test_common_factor_and_query_specific_parts() -> None:
    """A world whose queries share one subset effect: the common-factor LDS sees it, the
    query-specific LDS (both sides centred over queries) sees only what differs between queries."""
    from scipy.stats import spearmanr

    from carv_attrib.lds.metric import common_factor_lds, query_centered, subset_sums

    rng = np.random.default_rng(6)
    n, q, m = 20, 6, 40
    positions = np.stack([np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(m)])
    quality = rng.normal(size=n)  # a per-clip effect shared by every query
    specific = rng.normal(size=(n, q))
    gt = (quality[:, None] + specific)[positions].sum(1)
    sums = subset_sums(quality[:, None] + 0 * specific, positions)  # knows the shared part only
    assert common_factor_lds(sums, gt) == pytest.approx(spearmanr(sums.mean(1), gt.mean(1)).statistic)
    assert common_factor_lds(sums, gt) > 0.5
    c = query_centered(gt)
    np.testing.assert_allclose(c.mean(1), 0.0, atol=1e-12)
    # the centred sums of a method that knows only the shared part carry no query-specific signal
    assert np.allclose(query_centered(sums), 0.0)
    from carv_attrib.lds.metric import _spearman_columns

    knows_specific = query_centered(subset_sums(specific, positions))
    assert np.nanmean(_spearman_columns(knows_specific, c, axis=0)) > 0.5
