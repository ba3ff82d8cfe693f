"""Adaptive draws at query time (`score --refine`): more draws until the top-k settles.

A K-draw score is a Monte Carlo estimate (`search.uncertainty`); `p_top_k` says whether more draws
could change the top-k. `refine` adds *replicates* of the index's draw rule: replicate r ≥ 1 is the
same rule (scheme, K, density, proposal, noise mode, antithetic) under the seed `replicate_rule`
derives, an independent stratified set of K draws; a feature over R replicates is their mean, an
unbiased estimate of the same expectation with 1/R of one replicate's variance.

Every replicate goes to the query *and to all n candidates together* (the 2k + 10 clips score
searched). Under common random numbers most of a score's error is common to all clips (every clip
sees the same draws; the demo's se 0.046 against gaps' se_gap 0.003-0.007), and it cancels from a
comparison only when both clips were estimated from the same draws. Refining only the clips that
straddle the k-th score mixes a 1-replicate and an R-replicate estimate and loses that cancellation:
measured on the demo run, refining the straddling clips alone left 9 candidates unsettled after 3
rounds where the plain K-draw search had 3.

Replicate 0 is the index's own: its raw feature is recovered from the indexed vector
(`Preconditioner.raw_from_train`), except under `cosine`, whose index keeps no norm (recomputed
there, n·K more draws once). The standard errors linearise every replicate at the first estimate
(the query's and the clips' replicate-0 ψ), a second-order difference.

    out = refine(pre, rule, top_k=10, psi_c=psi_c, query_parts=q.parts, parts_of=parts_of, budget=480)
    out.scores, out.se, out.p_top_k, out.draws   # (n,), (n,), (n,), draws spent

`parts_of(c, r)` returns the raw per-draw parts (K, D) (`Featurizer.draw_parts` under
`replicate_rule(rule, r)`) of candidate c (an index into psi_c), or of the query for c = QUERY.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carv_attrib.carv.draws import DrawRule
from carv_attrib.search import uncertainty as unc

QUERY = -1  # `parts_of`'s candidate index for the query
LO = 0.05  # p_top_k in (LO, 1 − LO): not settled
MAX_REPLICATES = 16  # 16·K draws per clip: twice the K = 128 that plan's stability rule rarely needs


def replicate_rule(rule: DrawRule, r: int) -> DrawRule:
    """Replicate r of `rule`: r = 0 is the rule itself, r ≥ 1 the same rule under a seed derived from
    (seed, r) by SHA-256 (31 bits), so replicates never reuse the base stream's draws."""
    if r == 0:
        return rule
    digest = hashlib.sha256(f"carv-refine/{int(rule.seed)}/{int(r)}".encode()).digest()
    return dataclasses.replace(rule, seed=int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


@dataclass
class Refined:
    """The outcome for one query's n candidates (in the order given, not re-sorted)."""

    scores: np.ndarray  # (n,) float64
    se: np.ndarray  # (n,) float64
    p_top_k: np.ndarray  # (n,) float64
    replicates: np.ndarray  # (n,) int: replicates behind each clip's feature (1: the index's own)
    query_replicates: int
    draws: int  # extra draws spent (query and clips), in (σ, ε) draws
    rounds: int
    settled: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    shared: np.ndarray | None = None  # (n, U) the final variance basis (`uncertainty.variance_basis`)
    own: np.ndarray | None = None  # (n, U) its per-clip part under per-clip noise

    def to_json(self, budget: int) -> dict[str, Any]:
        return {
            "draws": int(self.draws),
            "budget": int(budget),
            "rounds": int(self.rounds),
            "settled": bool(self.settled),
            "query_replicates": int(self.query_replicates),
            "refined_clips": int((self.replicates > 1).sum()),
            "unsettled_by_round": [h["unsettled"] for h in self.history],
        }


class _Replicates:
    """The running sums and per-draw terms of R replicates (module docstring): raw totals Σ_r φ^(r)
    of the query (D,) and the candidates (n, D); per replicate the query side's terms (n, K) and the
    clip side's (n, K) or None (replicate 0 from the index: mirrored)."""

    def __init__(self, pre: Any, rule: DrawRule, psi_c: np.ndarray, query_parts: np.ndarray) -> None:
        self.pre, self.rule = pre, rule
        self.psi_c0 = np.asarray(psi_c, dtype=np.float64)  # (n, D)
        parts = np.asarray(query_parts, dtype=np.float64)
        self.k = parts.shape[0]
        d0, self.phi_q0 = unc.centred_draws(parts)
        self.psi_q0 = pre.prepare_query(self.phi_q0[None])[0].astype(np.float64)  # (D,)
        self.q_sum = self.phi_q0.copy()
        self.r_q = 1
        self.c_sum: np.ndarray | None = None  # (n, D) once refined
        self.raw0: np.ndarray | None = None  # (n, D) the clips' replicate-0 raw features
        self.xq = [unc.query_terms(pre.linearize(d0, self.phi_q0, "query"), self.psi_c0)]  # (n, K)
        self.xc: list[np.ndarray | None] = [
            unc.mirrored_clip_terms(pre, d0, self.phi_q0, self.psi_c0, self.psi_q0)
        ]

    def add(self, parts_of: Callable[[int, int], np.ndarray], recompute0: bool) -> None:
        """One more replicate for the query and every candidate (replicate 0's clip side first,
        when `recompute0`)."""
        pre, n = self.pre, self.psi_c0.shape[0]
        if self.c_sum is None:
            if recompute0:
                rows = [np.asarray(parts_of(c, 0), dtype=np.float64) for c in range(n)]  # (K, D) each
                self.raw0 = np.stack([p.sum(axis=0) for p in rows])
                self.xc[0] = np.stack([self._clip_terms(c, p) for c, p in enumerate(rows)])
            else:
                self.raw0 = pre.raw_from_train(self.psi_c0)
            self.c_sum = self.raw0.copy()
        r = self.r_q
        qp = np.asarray(parts_of(QUERY, r), dtype=np.float64)
        dq, tot = unc.centred_draws(qp)
        self.q_sum += tot
        self.xq.append(unc.query_terms(pre.linearize(dq, self.phi_q0, "query"), self.psi_c0))
        xc = np.empty((n, self.k))
        for c in range(n):
            p = np.asarray(parts_of(c, r), dtype=np.float64)
            self.c_sum[c] += p.sum(axis=0)
            xc[c] = self._clip_terms(c, p)
        self.xc.append(xc)
        self.r_q += 1

    def _clip_terms(self, c: int, parts: np.ndarray) -> np.ndarray:
        assert self.raw0 is not None
        dc, _ = unc.centred_draws(parts)
        return unc.clip_terms(self.pre.linearize(dc, self.raw0[c], "train"), self.psi_q0)  # (K,)

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scores (n,), shared basis (n, R·U), own basis or None) of the current means."""
        r = self.r_q
        psi_q = self.pre.prepare_query((self.q_sum / r)[None])[0].astype(np.float64)
        psi = self.psi_c0 if self.c_sum is None else self.pre.prepare_train(self.c_sum / r).astype(np.float64)
        scores = psi @ psi_q  # (n,)
        shared, own = [], []
        for xq, xc in zip(self.xq, self.xc):
            assert xc is not None
            if self.rule.noise == "shared":  # the same draws on both sides: terms add draw by draw
                shared.append(unc.variance_basis((xq + xc) / r, self.rule))
            else:
                shared.append(unc.variance_basis(xq / r, self.rule))
                own.append(unc.variance_basis(xc / r, self.rule))
        return scores, np.concatenate(shared, axis=1), (np.concatenate(own, axis=1) if own else None)


def refine(
    pre: Any,
    rule: DrawRule,
    top_k: int,
    psi_c: np.ndarray,
    query_parts: np.ndarray,
    parts_of: Callable[[int, int], np.ndarray],
    budget: int,
) -> Refined:
    """Add replicates to the query and all n candidates while some candidate has LO < p_top_k < 1 − LO
    and the next replicate fits in `budget` extra (σ, ε) draws (module docstring). `pre` the index's
    preconditioner, `psi_c` (n, D) the candidates' indexed vectors, `query_parts` (K, D) the query's
    replicate-0 parts; ValueError for a negative budget."""
    if budget < 0:
        raise ValueError(f"refine budget {budget}: must be >= 0 draws")
    reps = _Replicates(pre, rule, psi_c, query_parts)
    n, k = reps.psi_c0.shape[0], reps.k
    recompute0 = getattr(pre, "kind", "") == "cosine"  # its index keeps no norm to recover φ from
    spent, rounds, settled = 0, 0, False
    history: list[dict[str, Any]] = []
    while True:
        scores, shared, own = reps.state()
        p = unc.p_top_k(scores, shared, own, top_k)
        unsettled = int(((p > LO) & (p < 1 - LO)).sum())
        history.append({"unsettled": unsettled, "draws": spent})
        if unsettled == 0:
            settled = True
            break
        cost = k * (n + 1) + (k * n if recompute0 and rounds == 0 else 0)
        if spent + cost > budget or reps.r_q >= MAX_REPLICATES:
            break
        reps.add(parts_of, recompute0)
        spent += cost
        rounds += 1
    se = unc.standard_error(shared, own)
    replicates = np.full(n, reps.r_q, dtype=np.int64)
    return Refined(scores, se, p, replicates, reps.r_q, spent, rounds, settled, history, shared, own)
