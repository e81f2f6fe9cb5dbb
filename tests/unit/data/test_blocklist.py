"""data.blocklist: training with a blocklist never yields a blocklisted key (checked over a full epoch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sd3train.config.schema import DataConfig
from sd3train.data.datamodule import ShardDataModule
from tests.support.datamodules import one_epoch_keys
from tests.support.photo_shards import write_photo_shards

NUM_SAMPLES, PER_SHARD = 80, 20
ALL_KEYS = [f"{index:09d}" for index in range(NUM_SAMPLES)]
# 8 of 80 keys (10%), spread over all four shards.
BLOCKED = [ALL_KEYS[index] for index in (0, 7, 19, 20, 33, 46, 61, 79)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_photo_shards(tmp_path_factory.mktemp("photos"), count=NUM_SAMPLES, per_shard=PER_SHARD)


def write_blocklist(path: Path, keys: list[str]) -> Path:
    lines = ["# written by the deduplication tool", *keys[:4], "", "   ", *(f"  {key}  " for key in keys[4:])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_datamodule(datamodules) -> Callable[..., ShardDataModule]:
    def make(shards: str, blocklist: Path | None, **overrides) -> ShardDataModule:
        fields = dict(
            shards=shards, val_shards=None, resolution=32, aspect_buckets=True, bucket_step=16, batch_size=4,
            num_workers=2, shuffle_buffer=16, blocklist=str(blocklist) if blocklist else None,
            # 10% of the keys are blocklisted; a 5% budget checked from the first sample would trip at
            # once if they counted as bad.
            skip_budget=0.05, skip_budget_min_samples=0,
        )
        fields.update(overrides)
        return datamodules(DataConfig(**fields), seed=0)

    return make


def test_a_full_epoch_with_a_blocklist_never_yields_a_blocklisted_key(shards, tmp_path, make_datamodule):
    blocklist = write_blocklist(tmp_path / "blocklist.txt", BLOCKED)
    keys, skipped = one_epoch_keys(make_datamodule(shards, blocklist))
    assert not set(keys) & set(BLOCKED)
    assert Counter(keys) == Counter(key for key in ALL_KEYS if key not in BLOCKED)  # each other key once
    assert dict(skipped) == {"blocklisted": len(BLOCKED)}


def test_without_the_blocklist_the_same_epoch_has_every_key(shards, make_datamodule):
    keys, skipped = one_epoch_keys(make_datamodule(shards, None))
    assert Counter(keys) == Counter(ALL_KEYS) and not skipped


def test_a_missing_blocklist_file_names_data_blocklist(shards, tmp_path, make_datamodule):
    missing = tmp_path / "no-such-blocklist.txt"
    with pytest.raises(FileNotFoundError, match="data.blocklist") as caught:
        make_datamodule(shards, missing, num_workers=0).train_dataloader()
    assert str(missing) in str(caught.value)
