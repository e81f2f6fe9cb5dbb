"""Shard sources and which shards each (rank, DataLoader worker) reads in each epoch.

    urls = resolve_shard_urls("out/{00000..00009}.tar::pipe:aws s3 cp s3://bucket/x.tar -")
    plan = ShardPlan([Source(urls, 1.0)], seed=0, resampled=False)
    plan.shards(epoch=3, rank=0, world_size=2, worker=1, num_workers=2)

Exact passes (one source, `resampled=False`): the shard order of epoch e is a shuffle seeded from
(seed, e), the same on every rank; rank r takes every world_size-th shard of it and worker w every
num_workers-th of those, so each shard is read once per epoch across the job.

Resampled (or a weighted mix of several sources): each worker's epoch is `shards_per_epoch` draws,
source by weight, then a shard uniformly within it, with replacement, from a generator seeded from
(seed, e, rank, worker): an endless stream in epoch-sized pieces that resume can replay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import braceexpand

from sd3train.paths import REPO_ROOT
from sd3train.runtime.rng import derive_seed


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _local_path(spec: str) -> str:
    # `file:/abs/x.tar` (one slash) is a local path too.
    return spec[len("file:"):] if spec.startswith("file:") and not spec.startswith("file://") else spec


def resolve_shard_urls(spec: str, root: Path = REPO_ROOT) -> list[str]:
    """Expand `"a-{000000..000007}.tar::b.tar"` into a list; relative local paths are taken from `root`.

    URLs (`scheme://...`, `pipe:...`) and absolute paths are kept as they are.
    """
    urls = []
    for pattern in spec.split("::"):
        if not pattern.strip():
            continue
        for expanded in braceexpand.braceexpand(pattern.strip()):
            expanded = _local_path(expanded)
            if is_url(expanded):
                urls.append(expanded)
            else:
                path = Path(expanded).expanduser()
                urls.append(str(path if path.is_absolute() else root / path))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shard")
    return urls


def missing_local_shards(urls: list[str]) -> list[str]:
    return [url for url in urls if not is_url(url) and not Path(url).is_file()]


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0


class ShardPlan:
    """The shard list of every (epoch, rank, worker); a pure function of its arguments."""

    def __init__(self, sources: list[Source], seed: int, resampled: bool, shards_per_epoch: Optional[int] = None):
        if not sources or any(not source.urls for source in sources):
            raise ValueError("every shard source needs at least one shard")
        if any(not source.weight > 0 for source in sources):
            raise ValueError(f"source weights must be > 0, got {[source.weight for source in sources]}")
        if shards_per_epoch is not None and shards_per_epoch <= 0:
            raise ValueError(f"shards_per_epoch must be positive, got {shards_per_epoch}")
        self.sources = list(sources)
        self.seed = int(seed)
        # Several sources can only be mixed by weighted draws.
        self.resampled = bool(resampled) or len(sources) > 1
        self.shards_per_epoch = shards_per_epoch

    @property
    def num_shards(self) -> int:
        return sum(len(source.urls) for source in self.sources)

    def shards(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """The shards worker `worker` of rank `rank` reads in `epoch`, in reading order."""
        if not self.resampled:
            order = list(self.sources[0].urls)
            random.Random(derive_seed("shards", self.seed, epoch)).shuffle(order)
            return order[rank::world_size][worker::num_workers]
        draws = self.shards_per_epoch or math.ceil(self.num_shards / (world_size * num_workers))
        rng = random.Random(derive_seed("resampled-shards", self.seed, epoch, rank, worker))
        weights = [source.weight for source in self.sources]
        picked = []
        for _ in range(draws):
            source = rng.choices(self.sources, weights=weights)[0]
            picked.append(source.urls[rng.randrange(len(source.urls))])
        return picked
