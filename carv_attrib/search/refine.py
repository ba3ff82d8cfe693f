"""Adaptive draws at query time (`score --refine`): the next strata until the top-k settles.

A K-draw score is a Monte Carlo estimate (`search.uncertainty`); `p_top_k` says whether more draws
could change the top-k. `refine` extends the index's draws level by level (`carv.nested`: level ℓ
halves every stratum and adds one draw in each empty half, K·2^(ℓ−1) draws, so after L levels the
K·2^L draws are a stratified design at K·2^L strata with the index's own K among them; under iid
draws a level adds iid draws). The estimate stays unbiased with the same importance weights.

Every level goes to the query *and to all n candidates together* (the 2k + 10 clips score searched).
Under common random numbers most of a score's error is common to all clips (every clip sees the same
draws; on the demo se 0.046 against se_gap 0.003-0.007), and it cancels from a comparison only when
both clips were estimated from the same draws. Refining only the clips that straddle the k-th score
mixes estimates from different draws and loses that cancellation: measured on the demo run (with
independent replicates), refining the straddling clips alone left 9 candidates unsettled after 3
rounds where the plain K-draw search had 3.

Level 0 is the index's own: a clip's raw feature is recovered from its indexed vector
(`Preconditioner.raw_from_train`; under `cosine`, whose index keeps no norm, recomputed: n·K draws
once) and its level-0 clip side is mirrored (`uncertainty.mirrored_clip_terms`); every new level's
clip side is the clip's own. The standard errors linearise at the first estimate (the query's and
the clips' level-0 ψ), a second-order difference.

    out = refine(pre, rule, top_k=10, psi_c=psi_c, query_parts=q.parts, parts_of=parts_of, budget=b)
    out.scores, out.se, out.p_top_k, out.draws   # (n,), (n,), (n,), draws spent

`parts_of(c, level)` returns (parts (m, D) = w_d φ_d / m, u (m,)) of the level's m draws
(`Featurizer.level_parts`) of candidate c (an index into psi_c), or of the query for c = QUERY.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.nested import check_extendable, finest_order, level_draws, level_size
from carv_attrib.search import uncertainty as unc

QUERY = -1  # `parts_of`'s candidate index for the query
LO = 0.05  # p_top_k in (LO, 1 − LO): not settled
MAX_LEVEL = 4  # K·16 draws per clip: twice the K = 128 that plan's stability rule rarely needs
PartsFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]
# TRAK's preconditioner is fitted on the index's own K-draw features: a refined feature leaves their
# span, where (ΦᵀΦ + λI)⁻¹ amplifies it by 1/λ (bench/score_se.py: refined scores 1.2-1.6 against a
# reference 0.19; recall@5 0.55 against the K-draw 0.98), so refinement would need a refit
NOT_REFINABLE = {
    "trak": "its preconditioner is fitted on the index's own K-draw features; a refined feature leaves their span"
}


def check_refinable(preconditioner: str) -> None:
    """ValueError for a preconditioner kind whose scores refinement cannot extend (`NOT_REFINABLE`)."""
    if preconditioner in NOT_REFINABLE:
        raise ValueError(f"--refine with a {preconditioner} index: {NOT_REFINABLE[preconditioner]}")


@dataclass
class Refined:
    """The outcome for one query's n candidates (in the order given, not re-sorted)."""

    scores: np.ndarray  # (n,) float64
    se: np.ndarray  # (n,) float64
    p_top_k: np.ndarray  # (n,) float64
    draws_per_clip: int  # K·2^L after L levels (K: the index's own)
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
            "draws_per_clip": int(self.draws_per_clip),
            "unsettled_by_round": [h["unsettled"] for h in self.history],
        }


class _Levels:
    """Running sums and per-draw terms of the levels so far (module docstring): Σ_d y_d of the query
    (D,) and the candidates (n, D); per level the query side's terms (n, m), the clip side's (n, m),
    and the draws' u (the query's (m,), the clips' (n, m): the same rows under shared noise)."""

    def __init__(
        self, pre: Any, rule: DrawRule, psi_c: np.ndarray, query_parts: np.ndarray, u0: np.ndarray
    ) -> None:
        self.pre, self.rule = pre, rule
        self.psi_c0 = np.asarray(psi_c, dtype=np.float64)  # (n, D)
        parts = np.asarray(query_parts, dtype=np.float64)
        self.k = parts.shape[0]
        d0, self.phi_q0 = unc.centred_draws(parts)
        self.psi_q0 = pre.prepare_query(self.phi_q0[None])[0].astype(np.float64)  # (D,)
        self.q_sum, self.count = self.phi_q0 * self.k, self.k  # Σ_d y_d, M
        self.c_sum: np.ndarray | None = None  # (n, D) once refined
        self.raw0: np.ndarray | None = None  # (n, D) the clips' level-0 raw features
        self.xq = [unc.query_terms(pre.linearize(d0, self.phi_q0, "query"), self.psi_c0)]  # (n, K)
        self.xc = [unc.mirrored_clip_terms(pre, d0, self.phi_q0, self.psi_c0, self.psi_q0)]  # (n, K)
        n = self.psi_c0.shape[0]
        self.uq, self.uc = [np.asarray(u0)], [np.tile(np.asarray(u0), (n, 1))]
        self.level = 0

    def add(self, parts_of: PartsFn, recompute0: bool) -> None:
        """The next level for the query and every candidate (level 0's clip side first, when `recompute0`)."""
        pre, n = self.pre, self.psi_c0.shape[0]
        if self.c_sum is None:
            if recompute0:
                got = [
                    (np.asarray(p, dtype=np.float64), np.asarray(u))
                    for p, u in map(lambda c: parts_of(c, 0), range(n))
                ]
                self.raw0 = np.stack([p.sum(axis=0) for p, _ in got])
                self.xc[0] = np.stack([self._clip_terms(c, p) for c, (p, _) in enumerate(got)])
                self.uc[0] = np.stack([u for _, u in got])
            else:
                self.raw0 = pre.raw_from_train(self.psi_c0)
            self.c_sum = self.raw0 * self.k
        self.level += 1
        qp, uq = parts_of(QUERY, self.level)
        qp = np.asarray(qp, dtype=np.float64)
        m = qp.shape[0]
        self.q_sum = self.q_sum + qp.sum(axis=0) * m
        # every draw centred on its side's level-0 mean: one offset per side, which variance_basis removes
        self.xq.append(
            unc.query_terms(pre.linearize(qp * m - self.phi_q0, self.phi_q0, "query"), self.psi_c0)
        )
        self.uq.append(np.asarray(uq))
        xc, uc = np.empty((n, m)), np.empty((n, m))
        for c in range(n):
            p, u = parts_of(c, self.level)
            p = np.asarray(p, dtype=np.float64)
            self.c_sum[c] += p.sum(axis=0) * m
            xc[c], uc[c] = self._clip_terms(c, p), u
        self.xc.append(xc)
        self.uc.append(uc)
        self.count += m

    def _clip_terms(self, c: int, parts: np.ndarray) -> np.ndarray:
        """(m,) ⟨ψ_q0, J_c (y_d − φ_c0)⟩ of a clip's parts (m, D) = y_d / m, centred on its level-0
        feature like the mirrored level 0 (whose terms average to 0), so that all its draws share one offset."""
        assert self.raw0 is not None
        y = parts * parts.shape[0] - self.raw0[c]
        return unc.clip_terms(self.pre.linearize(y, self.raw0[c], "train"), self.psi_q0)

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scores (n,), shared basis (n, U), own basis or None) of the current means."""
        psi_q = self.pre.prepare_query((self.q_sum / self.count)[None])[0].astype(np.float64)
        if self.c_sum is None:
            psi = self.psi_c0
        else:
            psi = self.pre.prepare_train(self.c_sum / self.count).astype(np.float64)
        scores = psi @ psi_q  # (n,)
        xq, xc = np.concatenate(self.xq, axis=1), np.concatenate(self.xc, axis=1)  # (n, M)
        order_q = finest_order(self.rule, self.uq)
        if self.rule.noise == "shared":  # the same draws on both sides: terms add draw by draw
            return scores, unc.variance_basis((xq + xc)[:, order_q], self.rule), None
        uc = np.concatenate(self.uc, axis=1)  # (n, M): each clip's own stream
        own = np.stack(
            [unc.variance_basis(xc[c, finest_order(self.rule, [uc[c]])], self.rule) for c in range(len(xc))]
        )
        return scores, unc.variance_basis(xq[:, order_q], self.rule), own


def refine(
    pre: Any,
    rule: DrawRule,
    top_k: int,
    psi_c: np.ndarray,
    query_parts: np.ndarray,
    parts_of: PartsFn,
    budget: int,
    query_u: np.ndarray | None = None,
    clip_u: np.ndarray | None = None,
) -> Refined:
    """Add levels of nested strata to the query and all n candidates while some candidate has
    LO < p_top_k < 1 − LO and the next level fits in `budget` extra (σ, ε) draws (module docstring).
    `pre` the index's preconditioner, `psi_c` (n, D) the candidates' indexed vectors, `query_parts`
    (K, D) the query's level-0 parts, `query_u` (K,) and `clip_u` (n, K) the level-0 draws' u
    (default: the rule's on stream 0, the shared one, for all). ValueError for a negative budget or
    an antithetic rule."""
    if budget < 0:
        raise ValueError(f"refine budget {budget}: must be >= 0 draws")
    check_extendable(rule)
    check_refinable(getattr(pre, "kind", ""))
    u0 = query_u if query_u is not None else level_draws(rule, 0, 0, (1,))[3]
    lv = _Levels(pre, rule, psi_c, query_parts, u0)
    if clip_u is not None:
        lv.uc[0] = np.asarray(clip_u, dtype=np.float64)
    n, k = lv.psi_c0.shape[0], lv.k
    recompute0 = getattr(pre, "kind", "") == "cosine"  # its index keeps no norm to recover φ from
    spent, rounds, settled = 0, 0, False
    history: list[dict[str, Any]] = []
    while True:
        scores, shared, own = lv.state()
        p = unc.p_top_k(scores, shared, own, top_k)
        unsettled = int(((p > LO) & (p < 1 - LO)).sum())
        history.append({"unsettled": unsettled, "draws": spent})
        if unsettled == 0:
            settled = True
            break
        m = level_size(rule, lv.level + 1)
        cost = m * (n + 1) + (k * n if recompute0 and rounds == 0 else 0)
        if spent + cost > budget or lv.level >= MAX_LEVEL:
            break
        lv.add(parts_of, recompute0)
        spent += cost
        rounds += 1
    se = unc.standard_error(shared, own)
    return Refined(scores, se, p, lv.count, spent, rounds, settled, history, shared, own)
