"""Fixtures for tests/carv: a tiny Wan2.1 transformer (28k parameters)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_transformer() -> torch.nn.Module:
    """The tiny WanTransformer3DModel of `make-model --size tiny`, seeded, fp32, eval mode."""
    from carv_attrib.models.tiny import build_transformer

    return build_transformer("tiny", seed=0)
