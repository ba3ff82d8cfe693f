"""`carv.nested`: the next strata keep one draw per stratum at every level, extend the rule's own K
draws, and leave the estimator unbiased (checked against the exact expectation within a multiple of
the replicates' standard error)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from carv_attrib.carv import nested
from carv_attrib.carv.draws import DrawRule
from carv_attrib.carv.timesteps import Proposal, density

SHAPE = (2, 1, 2, 2)


def _proposal() -> Proposal:
    return Proposal.from_bins(
        torch.linspace(0, 1, 9), torch.linspace(1.0, 3.0, 8), density="uniform", mix=0.1
    )


def _rules() -> list[DrawRule]:
    return [
        DrawRule(seed=3, scheme="stratified", k=4, density="logit-normal:0,1"),
        DrawRule(seed=3, scheme="stratified-is", k=4, density="uniform", proposal=_proposal()),
        DrawRule(seed=3, scheme="iid", k=4, density="uniform"),
    ]


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.scheme)
def test_level_zero_is_the_rules_own_draws(rule: DrawRule) -> None:
    sigma, w, eps, _ = nested.level_draws(rule, 0, 0, SHAPE)
    s0, w0, e0 = rule.draws_for(0, SHAPE)
    assert torch.equal(sigma, s0) and torch.equal(w, w0) and torch.equal(eps, e0)


@pytest.mark.parametrize("rule", _rules()[:2], ids=lambda r: r.scheme)
def test_every_level_fills_each_finer_stratum_once(rule: DrawRule) -> None:
    us = []
    for level in range(4):
        u = nested.level_draws(rule, 5, level, SHAPE)[3]
        assert len(u) == nested.level_size(rule, level)
        us.append(u)
        n = rule.k * 2**level
        strata = np.sort(np.floor(np.concatenate(us) * n).astype(int))
        np.testing.assert_array_equal(strata, np.arange(n))
    order = nested.finest_order(rule, us)
    assert np.all(np.diff(np.concatenate(us)[order]) > 0)


def test_new_draws_are_deterministic_and_new() -> None:
    rule = _rules()[0]
    a = nested.level_draws(rule, 0, 2, SHAPE)
    b = nested.level_draws(rule, 0, 2, SHAPE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    e0 = rule.draws_for(0, SHAPE)[2]
    assert not any(torch.equal(e, f) for e in a[2] for f in e0)  # fresh noise, not a reused ε


def test_stratified_is_weights_are_p_over_q() -> None:
    rule = _rules()[1]
    sigma, w, _, _ = nested.level_draws(rule, 0, 1, SHAPE)
    torch.testing.assert_close(w, rule.proposal.weight(sigma).to(torch.float64))


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.scheme)
def test_the_extended_estimator_is_unbiased(rule: DrawRule) -> None:
    """(1/M) Σ_d w_d f(σ_d) over levels 0..2 (M = 4K) estimates E_p[σ²] (uniform p: 1/3; the
    logit-normal's by quadrature), over 400 seeds, within 4 standard errors of the replicates."""
    f = lambda s: s**2  # noqa: E731
    est = []
    for seed in range(400):
        r = DrawRule(seed=seed, scheme=rule.scheme, k=rule.k, density=rule.density, proposal=rule.proposal)
        total, m = 0.0, 0
        for level in range(3):
            sigma, w, _, _ = nested.level_draws(r, 0, level, (1,))
            total += float((w * f(sigma)).sum())
            m += len(sigma)
        est.append(total / m)
    p = density(rule.density)

    def quad(n: int) -> float:
        grid = torch.linspace(0, 1, n, dtype=torch.float64)[1:-1]
        return float(torch.trapezoid(f(grid) * p.pdf(grid), grid))

    truth, coarse = quad(200001), quad(100001)
    se = float(np.std(est, ddof=1) / math.sqrt(len(est)))
    assert abs(np.mean(est) - truth) < 4 * se + abs(truth - coarse)  # + the quadrature's own error


def test_antithetic_rules_are_refused() -> None:
    rule = DrawRule(seed=0, scheme="stratified", k=4, density="uniform", antithetic=True)
    with pytest.raises(ValueError, match="antithetic"):
        nested.level_draws(rule, 0, 1, SHAPE)
