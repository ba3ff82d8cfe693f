"""Cost model, variance components, ECM and the optimal number of draws per encode."""

from __future__ import annotations

import math

import pytest

from carv_attrib.carv.accounting import (
    Costs,
    VarianceComponents,
    cost,
    ecm,
    ecm_limit,
    k_continuous,
    optimal_k,
    variance,
)


def var_cost(k: int, costs: Costs, comps: VarianceComponents) -> float:
    return variance(1, k, comps) * cost(1, k, costs)


def test_formulas() -> None:
    costs, comps = Costs(c_enc=6.0, c_draw=0.5), VarianceComponents(between=0.2, within=3.0)
    assert cost(4, 8, costs) == pytest.approx(4 * 6.0 + 4 * 8 * 0.5)
    assert variance(4, 8, comps) == pytest.approx(0.2 / 4 + 3.0 / 32)
    # Var·cost does not depend on R.
    assert variance(7, 5, comps) * cost(7, 5, costs) == pytest.approx(var_cost(5, costs, comps))


def test_ecm() -> None:
    costs = Costs(c_enc=6.0, c_draw=0.5)
    base = VarianceComponents(between=0.2, within=3.0)
    assert ecm(1, costs, base, base) == pytest.approx(1.0)
    assert ecm(1, costs, base, base, r=9) == pytest.approx(1.0)
    method = VarianceComponents(between=0.2, within=0.6)
    expected = (0.2 + 3.0) * (6.0 + 0.5) / ((0.2 + 0.6 / 8) * (6.0 + 8 * 0.5))
    assert ecm(8, costs, method, base) == pytest.approx(expected)
    assert ecm(8, costs, method, base, r=3) == pytest.approx(expected)
    # Reusing the encode alone (iid, K draws) already pays off when encodes are expensive.
    assert ecm(8, costs, base, base) > 1


def test_optimal_k_matches_brute_force() -> None:
    for c_enc in (0.1, 1.0, 6.0, 40.0):
        for c_draw in (0.05, 0.5, 2.0):
            for between in (0.01, 0.3, 2.0):
                for within in (0.0, 0.5, 4.0, 50.0):
                    costs, comps = Costs(c_enc, c_draw), VarianceComponents(between, within)
                    for k_max in (1, 16, 256):
                        best = min(range(1, k_max + 1), key=lambda k, c=costs, v=comps: var_cost(k, c, v))
                        k = optimal_k(costs, comps, k_max=k_max)
                        assert var_cost(k, costs, comps) == pytest.approx(
                            var_cost(best, costs, comps), rel=1e-12
                        )
    costs, comps = Costs(6.0, 0.5), VarianceComponents(0.2, 3.0)
    assert k_continuous(costs, comps) == pytest.approx(math.sqrt(3.0 * 6.0 / (0.2 * 0.5)))
    with pytest.raises(ValueError):
        optimal_k(costs, comps, k_max=0)


def test_amortisation_limit_for_mode_latents() -> None:
    """σ_b² = 0: Var·cost decreases in K, K* = k_max, and ECM → (σ_b²+σ_w,iid²)(c_enc+c_draw)/(σ_w²·c_draw)."""
    costs = Costs(c_enc=6.0, c_draw=0.5)
    base = VarianceComponents(between=0.0, within=3.0)
    method = VarianceComponents(between=0.0, within=0.6)
    assert optimal_k(costs, method, k_max=64) == 64 and math.isinf(k_continuous(costs, method))
    limit = ecm_limit(costs, method, base)
    assert limit == pytest.approx(3.0 * 6.5 / (0.6 * 0.5))
    values = [ecm(k, costs, method, base) for k in (1, 4, 16, 256, 10**6)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)) and values[-1] < limit
    assert values[-1] == pytest.approx(limit, rel=1e-4)
    assert ecm_limit(costs, VarianceComponents(between=0.1, within=0.6), base) == 0.0
    assert math.isinf(ecm_limit(Costs(6.0, 0.0), method, base))


def test_validation() -> None:
    with pytest.raises(ValueError):
        Costs(-1.0, 1.0)
    with pytest.raises(ValueError):
        VarianceComponents(0.0, -1.0)
    with pytest.raises(ValueError):
        VarianceComponents(math.nan, 1.0)
