"""How stable a ranking is under the estimator's own randomness: two seeds, same everything else.

A K-draw score is a Monte Carlo estimate; K is large enough when another estimator seed would give
the user the same answer. For two score matrices of the same clips and queries (n_train, Q), one
per seed, per query q:

    overlap_q  = |top_k(S_a[:, q]) ∩ top_k(S_b[:, q])| / k          (top-k agreement)
    spearman_q = Pearson correlation of the ranks of S_a[:, q] and S_b[:, q]   (whole ranking)

`ranking_agreement` returns their means over queries; `STABLE` is the rule `plan` recommends K by
(the faithfulness issue: top-10 overlap ≥ 0.9 and Spearman ≥ 0.95 between two seeds).

    overlap, rho = ranking_agreement(S_seed0, S_seed1, top_k=10)
    ok = is_stable(overlap, rho)
"""

from __future__ import annotations

import numpy as np

STABLE = {"top_k": 10, "overlap": 0.9, "spearman": 0.95}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along axis 0 (ties broken by order; float scores have none in practice)."""
    return np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0, kind="stable").astype(np.float64)


def ranking_agreement(a: np.ndarray, b: np.ndarray, top_k: int = STABLE["top_k"]) -> tuple[float, float]:
    """(mean top-k overlap, mean Spearman) over the Q columns of two (n, Q) score matrices.

    NaN entries (a query's own clip, masked out) are ranked last in both and never in a top-k;
    k is capped at the number of finite scores per column."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (n, Q) score matrices of one shape, got {a.shape} and {b.shape}")
    overlaps, rhos = [], []
    for q in range(a.shape[1]):
        keep = np.isfinite(a[:, q]) & np.isfinite(b[:, q])
        x, y = a[keep, q], b[keep, q]
        k = min(int(top_k), x.size)
        if k < 1 or x.size < 2:
            continue
        top_x = set(np.argsort(-x, kind="stable")[:k].tolist())
        top_y = set(np.argsort(-y, kind="stable")[:k].tolist())
        overlaps.append(len(top_x & top_y) / k)
        rx, ry = _ranks(x[:, None])[:, 0], _ranks(y[:, None])[:, 0]
        rx, ry = rx - rx.mean(), ry - ry.mean()
        rhos.append(float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum())))
    if not overlaps:
        raise ValueError("no query column has two finite scores")
    return float(np.mean(overlaps)), float(np.mean(rhos))


def is_stable(overlap: float, spearman: float) -> bool:
    """The `STABLE` rule: top-k overlap ≥ 0.9 and Spearman ≥ 0.95."""
    return overlap >= STABLE["overlap"] and spearman >= STABLE["spearman"]
