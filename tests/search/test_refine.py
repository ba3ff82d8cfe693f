"""`search.refine` on a synthetic estimator with a known truth: replicates settle a top-k that K draws
leave open, the budget is kept, and a zero budget changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.nested import level_size
from carv_attrib.search import uncertainty as unc
from carv_attrib.search.precondition import NormalizePreconditioner
from carv_attrib.search.refine import QUERY, refine

RULE = DrawRule(seed=0, scheme="iid", k=8, density="uniform")


class World:
    """n clips with true features φ_c (D,); draw d of a level moves every feature by a common mode
    m_d·c (shared noise: the same draws for all) plus a smaller clip-own part. The query's true
    feature is clip 0's plus a tilt. iid draws: a level's m draws are just more draws."""

    def __init__(self, n: int = 12, d: int = 16, seed: int = 0, own: float = 0.3) -> None:
        self.own = own  # the clip-own part's scale: the mirrored level 0 ignores it (cheap se)
        rng = np.random.default_rng(seed)
        self.phi = rng.normal(size=(n, d)) + 4.0  # (n, D), all alike: scores close together
        self.phi_q = self.phi[0] + 0.3 * rng.normal(size=d)
        self.common = rng.normal(size=d)
        self.seed = seed

    def parts(self, who: int, level: int) -> tuple[np.ndarray, np.ndarray]:
        """((m, D) y_d / m, u (m,)) of clip `who` (or the query) at a level (m = `level_size`)."""
        m = level_size(RULE, level)
        rng = np.random.default_rng([self.seed, level, 0])  # the shared draws of the level
        mode = rng.normal(size=(m, 1)) * 2.0
        own = (
            np.random.default_rng([self.seed, level, who + 2]).normal(size=(m, self.phi.shape[1])) * self.own
        )
        base = self.phi_q if who == QUERY else self.phi[who]
        return (base + mode * self.common + own) / m, rng.random(m)


def _setup(world: World) -> tuple[NormalizePreconditioner, np.ndarray, np.ndarray, np.ndarray]:
    pre = NormalizePreconditioner(world.phi.shape[1])
    feats = np.stack([world.parts(c, 0)[0].sum(axis=0) for c in range(len(world.phi))])
    psi_c = pre.prepare_train(feats).astype(np.float64)
    truth = pre.prepare_train(world.phi).astype(np.float64) @ pre.prepare_query(world.phi_q[None])[0]
    return pre, psi_c, world.parts(QUERY, 0)[0], truth


def test_refine_settles_the_top_k_within_its_budget_and_finds_the_true_one() -> None:
    world = World()
    pre, psi_c, q0, truth = _setup(world)
    calls: list[tuple[int, int]] = []

    def parts_of(c: int, level: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((c, level))
        return world.parts(c, level)

    k, budget = 3, 8 * 13 * 15
    out = refine(pre, RULE, k, psi_c, q0, parts_of, budget)
    assert out.draws <= budget and out.draws == sum(level_size(RULE, lv) for _, lv in calls)
    assert out.history[0]["unsettled"] > 0  # K = 8 draws leave it open ...
    assert out.settled and out.history[-1]["unsettled"] == 0  # ... the replicates settle it
    top = set(np.argsort(-out.scores)[:k].tolist())
    assert top == set(np.argsort(-truth)[:k].tolist())
    assert (out.p_top_k[list(top)] > 1 - 0.05).all()


def test_a_zero_budget_changes_nothing() -> None:
    world = World(seed=1)
    pre, psi_c, q0, _ = _setup(world)
    out = refine(pre, RULE, 3, psi_c, q0, lambda c, r: pytest.fail("no draw may be spent"), 0)
    np.testing.assert_array_equal(
        out.scores, psi_c @ pre.prepare_query(q0.sum(axis=0)[None])[0].astype(np.float64)
    )
    assert out.draws == 0 and out.rounds == 0 and out.draws_per_clip == 8
    with pytest.raises(ValueError, match="budget"):
        refine(pre, RULE, 3, psi_c, q0, world.parts, -1)


def test_standard_errors_shrink_as_levels_are_added() -> None:
    world = World(seed=2, own=0.02)  # clips that move like the query: the mirror is right
    pre, psi_c, q0, _ = _setup(world)
    first = refine(pre, RULE, 3, psi_c, q0, world.parts, 0)
    budget = 13 * (8 + 16)  # levels 1 and 2 for the query and 12 clips: 8 → 32 draws
    more = refine(pre, RULE, 6, psi_c, q0, world.parts, budget)  # top-6 of 12: close calls remain
    assert more.rounds == 2 and more.draws_per_clip == 32 and more.draws == budget
    # 4× the draws: variance ~1/4, se ~1/2; the variance estimates' own spread (ν = 7 and 31 iid
    # draws) keeps the median ratio well within a factor 1.6 of it
    ratio = np.median(more.se / first.se)
    assert 0.5 / 1.6 < ratio < 0.5 * 1.6
    assert unc.standard_error(more.shared).shape == (12,)
