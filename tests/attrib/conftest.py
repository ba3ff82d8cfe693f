"""Fixtures of the attrib tests: the tiny Wan transformer, built once per session."""

from __future__ import annotations

import pytest
from torch import nn

from .helpers import tiny_wan


@pytest.fixture(scope="session")
def wan() -> nn.Module:
    return tiny_wan()
