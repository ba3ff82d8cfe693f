"""The linear datamodeling score (LDS) and its confidence intervals.

LDS (Park et al., TRAK, ICML 2023, eq. 5; dattri's `dattri.metric.lds`): for query q, the Spearman
rank correlation over M subset models between the predicted effect of subset S_m, Σ_{i∈S_m} τ(i, q),
and the measured output f_q(θ_{S_m}) (here −loss, so larger means the subset helped the query).
The LDS of a method is the mean over queries. 1 is a perfect linear datamodel; random scores give
≈ 0 ± 1/sqrt(M).

    per_q = lds_per_query(scores, gt_values, positions)     # (Q,)
    summary = lds_summary([per_q_seed0, per_q_seed1, ...])  # mean, CI over queries and seeds
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata


def lds_per_query(scores: np.ndarray, gt_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation over subsets between Σ_{i∈S_m} scores[i, q] and gt_values[m, q].

    scores (n_train, Q) float, gt_values (M, Q) float (−loss), positions (M, subset size) int
    training positions (or M index arrays of any sizes). Ties get average ranks; a constant column gives NaN (as scipy and dattri).
    """
    # (M, Q) predicted subset effect; positions may be ragged (a list of index arrays)
    sums = (
        scores[positions].sum(axis=1)
        if isinstance(positions, np.ndarray)
        else np.stack([scores[p].sum(0) for p in positions])
    )
    ra = rankdata(sums, axis=0)
    rb = rankdata(gt_values, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / denom


def lds_summary(per_query: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean LDS with a 95 % bootstrap CI over queries *and* replicates (projection/estimator seeds).

    per_query: R arrays (Q,), one per replicate. Each bootstrap draw resamples the Q queries and the
    R replicates with replacement and averages; the CI is the 2.5/97.5 percentiles. Also the SE over
    replicates of the per-replicate means (the estimator-and-projection part alone).
    """
    a = np.stack([np.asarray(p, dtype=np.float64) for p in per_query])  # (R, Q)
    rng = np.random.default_rng(seed)
    r, q = a.shape
    boots = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, r, r)
        cols = rng.integers(0, q, q)
        boots[b] = np.nanmean(a[np.ix_(rows, cols)])
    per_rep = np.nanmean(a, axis=1)
    return {
        "mean": float(np.nanmean(a)),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "se_replicates": float(per_rep.std(ddof=1) / np.sqrt(r)) if r > 1 else None,
        "replicates": [float(x) for x in per_rep],
        "queries": q,
    }


def random_floor(
    gt_values: np.ndarray, positions: np.ndarray, n_train: int, reps: int = 20
) -> dict[str, float]:
    """LDS of Gaussian random scores: this ground truth's noise floor (mean, sd over reps)."""
    rng = np.random.default_rng(12345)
    vals = [
        float(
            np.nanmean(
                lds_per_query(rng.standard_normal((n_train, gt_values.shape[1])), gt_values, positions)
            )
        )
        for _ in range(reps)
    ]
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1))}
