"""`search.refine` on a synthetic estimator with a known truth: replicates settle a top-k that K draws
leave open, the budget is kept, and a zero budget changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from carv_attrib.carv.draws import DrawRule
from carv_attrib.search import uncertainty as unc
from carv_attrib.search.precondition import NormalizePreconditioner
from carv_attrib.search.refine import QUERY, refine, replicate_rule

RULE = DrawRule(seed=0, scheme="iid", k=8, density="uniform")


def test_replicates_are_the_rule_under_other_seeds() -> None:
    assert replicate_rule(RULE, 0) is RULE
    seeds = {replicate_rule(RULE, r).seed for r in range(1, 50)}
    assert len(seeds) == 49 and RULE.seed not in seeds
    assert replicate_rule(RULE, 3) == replicate_rule(RULE, 3)
    assert replicate_rule(RULE, 3).k == RULE.k and replicate_rule(RULE, 3).scheme == RULE.scheme


class World:
    """n clips with true features φ_c (D,); draw k of replicate r moves every feature by a common
    mode m_rk·|φ_c| (shared noise: the same draws for all) plus a small clip-own part. The query's
    true feature is clip 0's direction plus a tilt."""

    def __init__(self, n: int = 12, d: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.phi = rng.normal(size=(n, d)) + 4.0  # (n, D), all alike: scores close together
        self.phi_q = self.phi[0] + 0.3 * rng.normal(size=d)
        self.common = rng.normal(size=d)
        self.seed = seed

    def parts(self, who: int, r: int, k: int = 8) -> np.ndarray:
        """(K, D) y_k / K of clip `who` (or the query) in replicate r."""
        rng = np.random.default_rng([self.seed, r, 0])  # the shared draws of replicate r
        m = rng.normal(size=(k, 1)) * 2.0
        own = np.random.default_rng([self.seed, r, who + 2]).normal(size=(k, self.phi.shape[1])) * 0.8
        base = self.phi_q if who == QUERY else self.phi[who]
        return (base + m * self.common + own) / k


def _setup(world: World) -> tuple[NormalizePreconditioner, np.ndarray, np.ndarray, np.ndarray]:
    pre = NormalizePreconditioner(world.phi.shape[1])
    feats = np.stack([world.parts(c, 0).sum(axis=0) for c in range(len(world.phi))])
    psi_c = pre.prepare_train(feats).astype(np.float64)
    truth = pre.prepare_train(world.phi).astype(np.float64) @ pre.prepare_query(world.phi_q[None])[0]
    return pre, psi_c, world.parts(QUERY, 0), truth


def test_refine_settles_the_top_k_within_its_budget_and_finds_the_true_one() -> None:
    world = World()
    pre, psi_c, q0, truth = _setup(world)
    calls: list[tuple[int, int]] = []

    def parts_of(c: int, r: int) -> np.ndarray:
        calls.append((c, r))
        return world.parts(c, r)

    k, budget = 3, 8 * 13 * 15
    out = refine(pre, RULE, k, psi_c, q0, parts_of, budget)
    assert out.draws <= budget and out.draws == 8 * len(calls)
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
    assert out.draws == 0 and out.rounds == 0 and out.query_replicates == 1
    with pytest.raises(ValueError, match="budget"):
        refine(pre, RULE, 3, psi_c, q0, world.parts, -1)


def test_standard_errors_shrink_as_replicates_are_added() -> None:
    world = World(seed=2)
    pre, psi_c, q0, _ = _setup(world)
    first = refine(pre, RULE, 3, psi_c, q0, world.parts, 0)
    more = refine(pre, RULE, 11, psi_c, q0, world.parts, 8 * 13 * 3)  # top-11 of 12: never settled
    assert more.rounds == 3 and more.query_replicates == 4
    # 4 replicates: variance ~1/4, so se ~1/2; allow the variance estimate's own spread (ν = 7 per
    # replicate, 28 in all: the ratio of two such estimates lies well within a factor 1.6)
    ratio = np.median(more.se / first.se)
    assert 0.5 / 1.6 < ratio < 0.5 * 1.6
    assert unc.standard_error(more.shared).shape == (12,)
