"""What adding an extension costs, shown by doing it: a new timestep scheme and a new projector, each
registered in one place of the library, then used through the library's own entry points.

A newcomer adds a scheme with a `Sampler` in `carv/timesteps.py` (`SAMPLERS`) and a projector with a
class in `attrib/projection.py` (`PROJECTOR_CLASSES`); the second file is `choices.py`, where the
CLI and the JSON schema read the names (tests/test_config.py and test_schema_enums.py hold them
equal). Here the registries are patched for the test only; nothing else is touched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from carv_attrib.attrib.featurizer import build_projector, load_featurizer
from carv_attrib.attrib.projection import PROJECTOR_CLASSES, DenseProjector
from carv_attrib.carv import timesteps
from carv_attrib.carv.draws import DrawRule
from carv_attrib.search.explain import strata_edges, stratum_of


def _draw_reversed(
    k: torch.Tensor, U: torch.Tensor, n: int, p: Any, proposal: Any
) -> tuple[torch.Tensor, ...]:
    """Stratified, strata visited from high σ to low: draw k lies in stratum n−1−k."""
    u = (n - 1 - k.to(torch.float64) + U) / n
    return p.icdf(u), torch.ones_like(u)


@pytest.fixture
def reversed_scheme(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(timesteps.SAMPLERS, "reversed", timesteps.Sampler(_draw_reversed, stratified=False))
    return "reversed"


def test_a_new_scheme_is_one_registry_entry(reversed_scheme: str) -> None:
    rule = DrawRule(seed=3, scheme=reversed_scheme, k=4)  # the rule accepts it: no other list to edit
    sigma, w, eps = rule.draws_for(7, (16, 2, 4, 4))
    assert sigma.shape == w.shape == (4,) and eps.shape == (4, 16, 2, 4, 4)
    # one σ per stratum, in reverse order: the sampler alone decided where the draws go
    edges = strata_edges(rule)
    assert np.array_equal(stratum_of(rule, sigma.numpy()), np.arange(4)[::-1])
    assert np.all(np.diff(sigma.numpy()) < 0) and edges[0] == 0.0 and edges[-1] == 1.0
    assert rule == DrawRule.from_dict(json.loads(json.dumps(rule.to_dict())))  # recorded like any rule


def test_an_unregistered_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown timestep scheme 'reversed'"):
        DrawRule(scheme="reversed")


class ScaledDense:
    """A newcomer's projector: the dense JL projector times 2 (kind "scaled-dense")."""

    def __init__(self, inner: DenseProjector):
        self.inner = inner
        self.dim = inner.dim

    @classmethod
    def build(
        cls, model: nn.Module, layers: list[tuple[str, nn.Linear]], *, patterns: Sequence[str], **options: Any
    ) -> ScaledDense:
        return cls(DenseProjector.build(model, layers, patterns=patterns, **options))

    @classmethod
    def from_spec(cls, model: nn.Module, spec: dict[str, Any]) -> ScaledDense:
        return cls(DenseProjector.from_spec(model, {**spec, "kind": "dense"}))

    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec(), "kind": "scaled-dense"}

    def batch_features(
        self, transformer: nn.Module, batch: Sequence[Any], output_fn: str = "loss", dpb: Any = None
    ):
        f, losses = self.inner.batch_features(transformer, batch, output_fn, dpb)
        return 2 * f, losses


def test_a_new_projector_is_one_class_and_one_registry_entry(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, encoded_run: Path
) -> None:
    from carv_attrib.store.latents import iter_cached

    monkeypatch.setitem(PROJECTOR_CLASSES, "scaled-dense", ScaledDense)
    clips = [(c.clip_id, c.latent, c.text_emb) for c in list(iter_cached(encoded_run))[:2]]
    rule = DrawRule(seed=0, scheme="stratified", k=2)

    def featurizer(**how: Any):
        return load_featurizer(str(tiny_model_dir), [None], rule, "loss", "cpu", "float32", **how)

    ours = featurizer(new_projector=lambda t: build_projector("scaled-dense", t, proj_dim=32))
    dense = featurizer(new_projector=lambda t: build_projector("dense", t, proj_dim=32))
    f_ours, *_ = ours.features(clips)
    f_dense, *_ = dense.features(clips)
    assert torch.equal(f_ours, 2 * f_dense)  # same matrix, same draws: exactly twice
    # rebuilt from its recorded spec, as score does
    specs = json.loads(json.dumps([p.spec() for p in ours.projectors]))
    again = featurizer(projector_specs=specs)
    assert torch.equal(again.features(clips)[0], f_ours)
