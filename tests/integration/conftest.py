"""Shared fixtures for end-to-end tests: small real shards, and the shipped config composed for CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3train.tools.make_shapes import build_shapes
from tests.support.config import REPO


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory) -> Path:
    """4 train shards of 64 samples and a 32-sample validation shard, written by the project's tool."""
    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, train=256, val=32, samples_per_shard=64)
    return out


@pytest.fixture(scope="session")
def repo_shapes() -> Path:
    """The default shards under data/shapes, as `make train` writes them (idempotent)."""
    out = REPO / "data" / "shapes"
    build_shapes(out)
    return out
