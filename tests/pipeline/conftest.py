"""Fixtures of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.worlds import World


@pytest.fixture
def world(tmp_path: Path, demo_data: Path, tiny_model_dir: Path) -> World:
    """An editable copy of the demo clips and manifest (`tests/pipeline/worlds.py`)."""
    return World(tmp_path / "world", demo_data, tiny_model_dir)
