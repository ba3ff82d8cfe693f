"""The untrained-model warning fires end to end on random-weight pipelines of every preset and stays
quiet on the demo's trained one (issue 22, item 5): the demo job at reduced sizes, its JSON's warnings
read back. The rule itself (`flatness`, sd of the scores / a score's standard error) is unit-tested in
test_generate.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from carv_attrib.config import DemoConfig
from carv_attrib.pipeline.demo import run_demo
from carv_attrib.pipeline.score import UNTRAINED_RATIO


def _demo(out: Path, preset: str, train_steps: int) -> dict:
    cfg = DemoConfig(
        out=out,
        clips=12,
        preset=preset,
        frames=9,
        size="32x32",
        train_steps=train_steps,
        plan_pilot_clips=0,
        inference_steps=2,
        top_k=10,
    )
    return run_demo(cfg).doc


@pytest.mark.parametrize("preset", ["tiny", "small", "medium"])
def test_a_random_pipeline_of_any_size_is_warned_about(tmp_path: Path, preset: str) -> None:
    doc = _demo(tmp_path / preset, preset, train_steps=0)
    results = doc["queries"][0]["results"]
    assert all(r["se"] is not None and r["se"] > 0 for r in results)
    assert any(
        "looks untrained" in w and f"trained models: ≥ {UNTRAINED_RATIO}" in w for w in doc["warnings"]
    )


def test_the_trained_demo_model_is_not(tmp_path: Path) -> None:
    doc = _demo(tmp_path / "trained", "tiny", train_steps=150)
    assert not any("untrained" in w for w in doc["warnings"])
