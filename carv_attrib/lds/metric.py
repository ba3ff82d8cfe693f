"""The linear datamodeling score (LDS) and its confidence intervals.

LDS (Park et al., TRAK, ICML 2023, eq. 5; dattri's `dattri.metric.lds`): for query q, the Spearman
rank correlation over M subset models between the predicted effect of subset S_m, Σ_{i∈S_m} τ(i, q),
and the measured output f_q(θ_{S_m}) (here −loss, so larger means the subset helped the query).
The LDS of a method is the mean over queries. 1 is a perfect linear datamodel; random scores give
≈ 0 ± 1/sqrt(M).

    per_q = lds_per_query(scores, gt_values, positions)     # (Q,)
    summary = lds_summary([per_q_seed0, per_q_seed1, ...])  # mean, CI over queries and seeds

A world's queries are often alike (their losses move together over subsets), so resampling queries
alone understates the uncertainty: the M subsets are a sample too. `LdsBootstrap` resamples
subsets, queries and replicates with one set of indices shared by every setting scored on the
same ground truth, so CIs of a difference or a ratio between two settings are paired:

Two parts of the same number, when the queries' measured outputs move together over the subsets
(a subset that makes a better model for every query): the *common-factor* LDS, one Spearman over
subsets between the query-averaged predicted effect and the query-averaged output (does the method
know which subsets make a better model?), and the *query-specific* LDS, the LDS after subtracting
each subset's mean over queries from both sides (`query_centered`: does it know which subsets help
*this* query more than the others?). A world whose queries correlate strongly has an LDS dominated by
the first, which is a single correlation over M subsets and so noisy (sd ≈ 1/sqrt(M − 1)).

    boot = LdsBootstrap(m=40, q=16)
    a = boot.samples([subset_sums(S_r, positions) for S_r in setting_scores], gt)   # (n_boot,)
    ci = np.percentile(a / boot.samples(ref_sums, gt), [2.5, 97.5])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata


def subset_sums(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(M, Q) predicted subset effects Σ_{i∈S_m} scores[i, q]; positions (M, size) or M ragged arrays."""
    return (
        scores[positions].sum(axis=1)
        if isinstance(positions, np.ndarray)
        else np.stack([scores[p].sum(0) for p in positions])
    )


def _spearman_columns(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Spearman correlation along `axis` (average ranks for ties; NaN for a constant column)."""
    ra = rankdata(a, axis=axis)
    rb = rankdata(b, axis=axis)
    ra = ra - ra.mean(axis=axis, keepdims=True)
    rb = rb - rb.mean(axis=axis, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis) * (rb**2).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis) / denom


def lds_from_sums(sums: np.ndarray, gt_values: np.ndarray) -> np.ndarray:
    """(Q,) Spearman over subsets between predicted subset effects (M, Q) and outputs (M, Q)."""
    return _spearman_columns(np.asarray(sums, dtype=np.float64), gt_values, axis=0)


def lds_per_query(scores: np.ndarray, gt_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation over subsets between Σ_{i∈S_m} scores[i, q] and gt_values[m, q].

    scores (n_train, Q) float, gt_values (M, Q) float (−loss), positions (M, subset size) int
    training positions (or M index arrays of any sizes). Ties get average ranks; a constant column gives NaN (as scipy and dattri).
    """
    return lds_from_sums(subset_sums(scores, positions), gt_values)


class LdsBootstrap:
    """Bootstrap indices over M subsets and Q queries (and replicates), fixed by `seed`, shared by
    every setting scored on one ground truth: `samples` gives (n_boot,) LDS values, so the samples of
    two settings are paired (the same subsets and queries in each draw)."""

    def __init__(self, m: int, q: int, n_boot: int = 1000, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.m, self.q, self.n_boot, self.seed = m, q, n_boot, seed
        self.rows = rng.integers(0, m, (n_boot, m))  # (B, M) resampled subsets
        self.cols = rng.integers(0, q, (n_boot, q))  # (B, Q) resampled queries
        self._rank_cache: dict[tuple[Any, bytes], np.ndarray] = {}

    def _ranks_of(self, gt_values: np.ndarray) -> np.ndarray:
        # The ground truth's resampled ranks are the same for every setting scored on it: computed
        # once per ground truth (keyed by its bytes): ~30 % of a study's many rows.
        gt = np.asarray(gt_values, dtype=np.float64)
        key = (gt.shape, hashlib.blake2b(gt.tobytes(), digest_size=16).digest())
        if key not in self._rank_cache:
            rb = rankdata(gt[self.rows], axis=1)  # (B, M, Q)
            self._rank_cache[key] = rb - rb.mean(axis=1, keepdims=True)
        return self._rank_cache[key]

    def samples(self, sums: Sequence[np.ndarray], gt_values: np.ndarray) -> np.ndarray:
        """(n_boot,) mean LDS of each bootstrap draw; sums: one (M, Q) `subset_sums` per replicate,
        the replicates resampled too (a generator seeded by `seed` and their number)."""
        rb = self._ranks_of(gt_values)  # (B, M, Q) centred ranks, shared by every setting
        per_rep = []
        for s in sums:
            ra = rankdata(np.asarray(s, dtype=np.float64)[self.rows], axis=1)  # (B, M, Q)
            ra = ra - ra.mean(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                rho = (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))  # (B, Q)
            per_rep.append(np.nanmean(np.take_along_axis(rho, self.cols, axis=1), axis=1))  # (B,)
        stack = np.stack(per_rep)  # (R, B)
        r = stack.shape[0]
        reps = np.random.default_rng([self.seed, r]).integers(0, r, (self.n_boot, r))  # (B, R)
        return np.take_along_axis(stack.T, reps, axis=1).mean(1)


def query_centered(x: np.ndarray) -> np.ndarray:
    """(M, Q) minus each row's mean over the Q queries: the query-specific part of subset sums or of
    measured outputs (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=1, keepdims=True)


def common_factor_lds(sums: np.ndarray, gt_values: np.ndarray) -> float:
    """Spearman over the M subsets between the query-averaged predicted effect and the
    query-averaged measured output (sums, gt_values (M, Q))."""
    return float(_spearman_columns(np.asarray(sums).mean(1), np.asarray(gt_values).mean(1), axis=0))


def interval(samples: np.ndarray) -> list[float]:
    """The 2.5 / 97.5 percentiles of bootstrap samples (NaN samples dropped)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def lds_summary(
    per_query: Sequence[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    *,
    sums: Sequence[np.ndarray] | None = None,
    gt_values: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean LDS with a 95 % bootstrap CI over queries *and* replicates (projection/estimator seeds),
    and over subsets too when `sums` (one (M, Q) `subset_sums` per replicate) and `gt_values` are
    given (`ci95_subsets`: the CI to quote when queries are alike).

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
    out = {
        "mean": float(np.nanmean(a)),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "se_replicates": float(per_rep.std(ddof=1) / np.sqrt(r)) if r > 1 else None,
        "replicates": [float(x) for x in per_rep],
        "queries": q,
    }
    if sums is not None and gt_values is not None:
        boot = LdsBootstrap(gt_values.shape[0], q, min(n_boot, 1000), seed)
        out["ci95_subsets"] = interval(boot.samples(sums, gt_values))
        out["subsets"] = int(gt_values.shape[0])
    return out


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
