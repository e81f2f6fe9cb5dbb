"""The `datamodules` fixture: ShardDataModules that are torn down when the test ends, passed or failed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sd3train.config.schema import DataConfig
from sd3train.data.datamodule import ShardDataModule


@pytest.fixture
def datamodules() -> Iterator[Callable[..., ShardDataModule]]:
    """`datamodules(cfg, seed=0)` builds a ShardDataModule; after the test each gets `teardown("fit")`, as
    Lightning does after fit, so its persistent DataLoader workers stop then.

    Held until then: a datamodule left in a reference cycle (a caught exception's traceback and the
    test's frame make one) would otherwise go to the garbage collector, which finalises the worker
    queues first and then waits 5 s per worker. Idle workers cost about 10 MB each meanwhile.
    """
    built: list[ShardDataModule] = []

    def build(cfg: DataConfig, seed: int = 0) -> ShardDataModule:
        built.append(ShardDataModule(cfg, seed=seed))
        return built[-1]

    yield build
    while built:
        built.pop().teardown("fit")
