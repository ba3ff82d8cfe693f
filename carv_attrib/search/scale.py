"""Where a score stands among the query's scores over the whole run: percentile and z-score.

A raw score ⟨ψ_q, ψ_i⟩ has no fixed range (it scales with the features, the preconditioner and the
model), so on its own "0.9973" says nothing. Against the same query's scores of every indexed clip,
it does: `percentile` is the share of the run's clips that score at most as high (100: nothing
above it), `z` = (s − mean) / sd of those scores. Two results of one query compare by either; across
queries, compare percentiles (each query's scores have their own scale).

The run's scores come from the index itself:
- exact: every clip scored (the search already returned them all, or the run has at most
  `EXACT_MAX` clips and the vectors can be read back), method "exact";
- sample: `SAMPLE` clips drawn uniformly without replacement (seeded, the same for every query),
  method "sample". A percentile from n sampled scores has standard error ≤ 50/√n points (binomial,
  p(1−p) ≤ 1/4): 0.5 points at n = 10,000; mean and sd are the sample's.
Where the index cannot give vectors back (IVF without stored vectors) there is no scale (None).

    scale = RunScale.from_scores(all_scores, "exact", n_run)
    pct, z = scale.place(score)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

EXACT_MAX = 20_000  # runs up to this size are scored whole (one (n, D) @ (D,) product per query)
SAMPLE = 10_000  # clips sampled beyond it: percentile SE ≤ 0.5 points
METHODS = ("exact", "sample")


@dataclass(frozen=True)
class RunScale:
    """One query's scores over the run, as far as they were read: `sorted_scores` (n,) float64
    ascending, of `n_run` clips in all; `method` "exact" (n == n_run) or "sample"."""

    sorted_scores: np.ndarray
    method: str
    n_run: int
    mean: float
    sd: float
    own: dict[int, float] | None = None  # clip id -> its score as the scale computed it

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, method: str, n_run: int, ids: np.ndarray | None = None
    ) -> RunScale:
        """`scores` (n,) of the clips `ids` (n,) int64 when known: a result among them is placed by
        its own score here, so a float32 search score and the float64 one agree on its rank."""
        raw = np.asarray(scores, dtype=np.float64).ravel()
        if raw.size == 0:
            raise ValueError("a run scale needs at least one score")
        own = None if ids is None else dict(zip(np.asarray(ids).tolist(), raw.tolist()))
        return cls(np.sort(raw), method, int(n_run), float(raw.mean()), float(raw.std()), own)

    def place(self, score: float, clip_id: int | None = None) -> tuple[float, float | None]:
        """(percentile in [0, 100]: share of the run's scores ≤ `score`, z-score or None when every
        score is equal). A `clip_id` the scale scored is placed by that score."""
        pct, z = self.place_many(np.array([score]), None if clip_id is None else np.array([clip_id]))
        return float(pct[0]), (None if z is None else float(z[0]))

    def place_many(
        self, scores: np.ndarray, clip_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Vectorised `place`: (percentiles (m,) float64, z (m,) float64 or None when sd is 0) of
        `scores` (m,), one sorted search for all of them (O(m log n))."""
        s = np.asarray(scores, dtype=np.float64).copy()
        if clip_ids is not None and self.own is not None:
            for j, i in enumerate(np.asarray(clip_ids).tolist()):
                s[j] = self.own.get(i, s[j])
        pct = 100.0 * np.searchsorted(self.sorted_scores, s, side="right") / self.sorted_scores.size
        ok = self.sd > 0 and math.isfinite(self.sd)
        return pct, ((s - self.mean) / self.sd if ok else None)

    def percentile_se(self) -> float:
        """Standard error of a percentile, in points: 0 when exact, 50/√n bound when sampled."""
        return 0.0 if self.method == "exact" else 50.0 / math.sqrt(self.sorted_scores.size)

    def to_json(self) -> dict[str, Any]:
        """The document's per-query "scale" block."""
        return {
            "method": self.method,
            "scores": int(self.sorted_scores.size),
            "clips": self.n_run,
            "mean": self.mean,
            "sd": self.sd,
            "median": float(np.median(self.sorted_scores)),
            "max": float(self.sorted_scores[-1]),
            "percentile_se": round(self.percentile_se(), 3),
        }


def sample_ids(n_run: int, seed: int = 0, sample: int = SAMPLE, exact_max: int = EXACT_MAX) -> np.ndarray:
    """(n,) int64 clip positions whose scores make the scale: all of them up to `exact_max`, else
    `sample` drawn uniformly without replacement (numpy PCG64 seeded by `seed`), ascending."""
    if n_run <= exact_max:
        return np.arange(n_run, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_run, size=sample, replace=False)).astype(np.int64)


CHUNK_BYTES = 256 << 20  # float64 vectors read per step: memory stays ~2× this whatever D is


def run_scales(
    psi: np.ndarray,
    ids: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    n_run: int,
    keep_own: bool = True,
) -> list[RunScale]:
    """One RunScale per query row of `psi` (m, D): scores ⟨ψ_q, v_i⟩ of the clips `ids` (their indexed
    vectors read by `vectors(ids_chunk) -> (c, D)`, CHUNK_BYTES of float64 at a time); "exact" when
    `ids` covers the whole run of `n_run` clips. `keep_own`: results among `ids` are placed by these
    scores (False when the displayed scores come from other vectors, e.g. an approximate index's
    codes). Raises what `vectors` raises (RuntimeError from faiss for an index that cannot
    reconstruct)."""
    psi64 = np.asarray(psi, dtype=np.float64)  # (m, D)
    chunk = max(1, CHUNK_BYTES // (8 * max(1, psi64.shape[1])))
    parts = []
    for start in range(0, len(ids), chunk):
        v = np.asarray(vectors(ids[start : start + chunk]), dtype=np.float64)  # (c, D)
        parts.append(v @ psi64.T)  # (c, m)
    scores = np.concatenate(parts, axis=0) if parts else np.zeros((0, psi64.shape[0]))  # (n, m)
    method = "exact" if len(ids) == n_run else "sample"
    own_ids = ids if keep_own else None
    return [RunScale.from_scores(scores[:, j], method, n_run, own_ids) for j in range(psi64.shape[0])]
