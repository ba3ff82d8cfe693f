"""The Objective type: its recorded forms, and the motion weights it hands the featurizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carv_attrib.carv.weights import MOTION_FLOOR, MOTION_NOISE, Objective, motion_weights


def test_uniform_weighs_nothing_and_records_only_its_kind() -> None:
    obj = Objective.from_spec(None)
    assert obj == Objective() and obj.spec() == {"kind": "uniform"}
    assert obj.weights(None) is None and obj.weights(np.ones((2, 3, 3))) is None


def test_motion_spec_round_trips_through_json() -> None:
    obj = Objective("motion", rule="farneback-v1")
    spec = json.loads(json.dumps(obj.spec()))
    assert spec == {"kind": "motion", "floor": MOTION_FLOOR, "noise": MOTION_NOISE, "rule": "farneback-v1"}
    assert Objective.from_spec(spec) == obj


def test_a_motion_spec_from_before_the_noise_floor_reads_as_noise_zero() -> None:
    old = {"kind": "motion", "floor": 0.1, "rule": "farneback-v1"}
    assert Objective.from_spec(old).noise == 0.0


def test_motion_weights_are_the_weight_rule_of_its_parameters() -> None:
    m = np.random.default_rng(0).gamma(2.0, 1.0, size=(2, 4, 4))
    obj = Objective("motion", floor=0.2, noise=0.5)
    assert np.array_equal(obj.weights(m), motion_weights(m, 0.2, 0.5))
    with pytest.raises(ValueError, match="motion map"):
        obj.weights(None)


@pytest.mark.parametrize("spec", [{"kind": "saliency"}, {"kind": "saliency", "floor": 0.1}])
def test_an_unknown_kind_is_refused(spec: dict) -> None:
    with pytest.raises(ValueError, match=r"unknown objective 'saliency'"):
        Objective.from_spec(spec)
