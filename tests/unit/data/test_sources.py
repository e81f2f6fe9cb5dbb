"""Shard plans: exact passes split over ranks and workers, resampled epochs, weighted source mixes."""

from __future__ import annotations

from collections import Counter

import pytest

from sd3train.data.sources import ShardPlan, Source, resolve_shard_urls


def test_exact_plan_covers_each_shard_once_per_epoch_and_reshuffles():
    plan = ShardPlan([Source(tuple(f"s{i}" for i in range(12)))], seed=3, resampled=False)
    for epoch in range(3):
        parts = [plan.shards(epoch, rank, 2, worker, 3) for rank in (0, 1) for worker in range(3)]
        assert sorted(url for part in parts for url in part) == sorted(f"s{i}" for i in range(12))
    assert plan.shards(0, 0, 1, 0, 1) != plan.shards(1, 0, 1, 0, 1)
    assert plan.shards(0, 0, 1, 0, 1) == ShardPlan([Source(tuple(f"s{i}" for i in range(12)))], 3, False).shards(0, 0, 1, 0, 1)


def test_resampled_plan_draws_the_fair_share_with_replacement_per_worker():
    plan = ShardPlan([Source(tuple(f"s{i}" for i in range(10)))], seed=0, resampled=True)
    part = plan.shards(0, 1, 2, 1, 2)
    assert len(part) == 3  # ceil(10 / (2 ranks x 2 workers))
    assert plan.shards(0, 1, 2, 1, 2) == part and plan.shards(1, 1, 2, 1, 2) != part
    assert len(ShardPlan([Source(("a", "b"))], 0, True, shards_per_epoch=7).shards(0, 0, 1, 0, 1)) == 7


def test_weighted_sources_are_mixed_in_proportion():
    plan = ShardPlan([Source(("a0", "a1")), Source(("b0", "b1", "b2"), weight=3.0)], seed=0, resampled=False)
    assert plan.resampled  # several sources can only be mixed by weighted draws
    draws = Counter(url[0] for epoch in range(200) for url in plan.shards(epoch, 0, 1, 0, 1))
    assert sum(draws.values()) == 200 * 5
    assert draws["b"] / sum(draws.values()) == pytest.approx(0.75, abs=0.03)


def test_bad_sources_are_refused():
    with pytest.raises(ValueError, match="weights must be > 0"):
        ShardPlan([Source(("a",), weight=0.0)], 0, False)
    with pytest.raises(ValueError, match="names no shard"):
        resolve_shard_urls(" :: ")
