"""ShardDataModule: batch format, reproducible order (0 and 2 workers), epochs, ranks, validation, state."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest
import torch

from sd3train.config.schema import DataConfig
from sd3train.data.datamodule import REPO_ROOT, ShardDataModule, resolve_shard_urls
from sd3train.data.shapes import parse_caption
from sd3train.data.sources import ShardPlan, Source
from sd3train.tools.make_shapes import build_shapes

# 64 train samples in 4 shards of 16, 16 val samples; batches of 8. With 2 workers each worker
# reads 2 shards = 32 samples = 4 full batches, so one epoch is exactly 8 batches with no drop.
NUM_TRAIN, SHARD_SIZE, BATCH = 64, 16, 8
BATCHES_PER_EPOCH = NUM_TRAIN // BATCH


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    build_shapes(folder, train=NUM_TRAIN, val=16, size=32, seed=0, samples_per_shard=SHARD_SIZE)
    return folder


@pytest.fixture
def make_datamodule(datamodules) -> Callable[..., ShardDataModule]:
    def make(shards: Path, seed: int = 0, **overrides) -> ShardDataModule:
        fields = dict(
            shards=str(shards / "train-{000000..000003}.tar"),
            val_shards=str(shards / "val-000000.tar"),
            resolution=16,  # shards hold 32x32 images: the resize path runs
            batch_size=BATCH,
            num_workers=0,
            shuffle_buffer=20,
            val_batches=1,
        )
        fields.update(overrides)
        return datamodules(DataConfig(**fields), seed=seed)

    return make


def first_keys(datamodule: ShardDataModule, num_batches: int) -> list[list[str]]:
    return [batch["keys"] for batch in islice(datamodule.train_dataloader(), num_batches)]


def test_train_batch_has_images_in_range_and_grammar_captions(shards, make_datamodule):
    batch = next(iter(make_datamodule(shards).train_dataloader()))
    assert sorted(batch) == [
        "captions", "crop_offsets", "flipped", "images", "keys", "original_sizes", "synthetic_captions", "urls"
    ]
    assert batch["original_sizes"].tolist() == [[32, 32]] * BATCH and batch["crop_offsets"].tolist() == [[0, 0]] * BATCH
    images = batch["images"]
    assert images.shape == (BATCH, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.5 and images.max() > 0.5  # real content, not a constant
    assert len(batch["captions"]) == BATCH and all(parse_caption(c) for c in batch["captions"])
    assert len(set(batch["keys"])) == BATCH and all(k.startswith("train-") for k in batch["keys"])
    assert all(Path(url).name.startswith("train-") and url.endswith(".tar") for url in batch["urls"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_gives_same_key_order(shards, num_workers, make_datamodule):
    first = first_keys(make_datamodule(shards, seed=3, num_workers=num_workers), 6)
    second = first_keys(make_datamodule(shards, seed=3, num_workers=num_workers), 6)
    assert first == second
    assert len({key for keys in first for key in keys}) == 6 * BATCH


def test_different_seed_gives_different_order(shards, make_datamodule):
    assert first_keys(make_datamodule(shards, seed=0), 2) != first_keys(make_datamodule(shards, seed=1), 2)


def test_every_key_once_per_epoch_with_two_workers_and_new_order_next_epoch(shards, make_datamodule):
    datamodule = make_datamodule(shards, num_workers=2)
    stream = iter(datamodule.train_dataloader())
    epochs = []
    for epoch in range(2):
        keys = [key for _ in range(BATCHES_PER_EPOCH) for key in next(stream)["keys"]]
        assert datamodule.epoch == epoch and datamodule.batches_in_epoch == BATCHES_PER_EPOCH
        assert sorted(keys) == [f"train-{i:09d}" for i in range(NUM_TRAIN)]
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    next(stream)
    assert (datamodule.epoch, datamodule.batches_in_epoch, datamodule.batches_consumed) == (2, 1, 17)


def test_restarted_iteration_continues_where_the_consumed_batches_end(shards, make_datamodule):
    reference = first_keys(make_datamodule(shards, num_workers=2), BATCHES_PER_EPOCH + 2)
    datamodule = make_datamodule(shards, num_workers=2)
    batches = datamodule.train_dataloader()
    list(islice(batches, 3))  # left part-way through epoch 0
    # Iterated again: the rest of epoch 0, then epoch 1, as if never interrupted.
    assert [batch["keys"] for batch in islice(batches, BATCHES_PER_EPOCH - 1)] == reference[3:]
    assert (datamodule.epoch, datamodule.batches_in_epoch, datamodule.batches_consumed) == (1, 2, 10)


def test_ranks_read_disjoint_halves(shards, monkeypatch, make_datamodule):
    keys_by_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = first_keys(make_datamodule(shards), BATCHES_PER_EPOCH // 2)
        keys_by_rank.append({key for keys in batches for key in keys})
    assert len(keys_by_rank[0]) == len(keys_by_rank[1]) == NUM_TRAIN // 2
    assert keys_by_rank[0] | keys_by_rank[1] == {f"train-{i:09d}" for i in range(NUM_TRAIN)}


def test_epoch_shards_split_by_rank_and_worker_cover_each_shard_once():
    urls = [f"s{i}" for i in range(8)]
    plan = ShardPlan([Source(tuple(urls))], seed=0, resampled=False)
    parts = [plan.shards(5, rank, 2, worker, 2) for rank in (0, 1) for worker in (0, 1)]
    assert [len(part) for part in parts] == [2, 2, 2, 2]
    assert sorted(url for part in parts for url in part) == urls
    assert plan.shards(5, 0, 1, 0, 1) != plan.shards(6, 0, 1, 0, 1)


def test_val_loader_is_fixed_order_deterministic_and_bounded(shards, make_datamodule):
    datamodule = make_datamodule(shards, val_batches=1)
    first, second = list(datamodule.val_dataloader()), list(datamodule.val_dataloader())
    assert len(first) == 1
    assert first[0]["keys"] == [f"val-{i:09d}" for i in range(BATCH)]
    assert torch.equal(first[0]["images"], second[0]["images"])
    # Bounded by the data too: 16 val samples give 2 batches of 8 even if 5 are allowed.
    assert [len(b["keys"]) for b in make_datamodule(shards, val_batches=5).val_dataloader()] == [8, 8]
    assert make_datamodule(shards, val_shards=None).val_dataloader() == []


def test_state_round_trips_and_resume_continues_the_same_stream(shards, make_datamodule):
    datamodule = make_datamodule(shards)
    first_keys(datamodule, 3)
    state = datamodule.state_dict()
    (rank_state,) = state["ranks"]
    assert (rank_state["epoch"], rank_state["consumed_in_epoch"], rank_state["batches_consumed"], state["seed"]) == (0, [3], 3, 0)
    resumed = make_datamodule(shards)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    reference = first_keys(make_datamodule(shards), 5)
    assert first_keys(resumed, 2) == reference[3:]
    assert (resumed.epoch, resumed.batches_in_epoch, resumed.batches_consumed) == (0, 5, 5)
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({**state, "version": 99})


def test_relative_shard_paths_resolve_against_repo_root(tmp_path):
    assert REPO_ROOT == Path(__file__).resolve().parents[3]
    assert resolve_shard_urls("data/shapes/train-{000000..000001}.tar") == [
        str(REPO_ROOT / "data/shapes/train-000000.tar"),
        str(REPO_ROOT / "data/shapes/train-000001.tar"),
    ]
    assert resolve_shard_urls(f"{tmp_path}/a.tar::https://host/b-{{0..1}}.tar::pipe:cat c.tar") == [
        f"{tmp_path}/a.tar", "https://host/b-0.tar", "https://host/b-1.tar", "pipe:cat c.tar"
    ]


def test_missing_shards_fail_naming_the_option_or_the_command_that_makes_them(tmp_path, make_datamodule, datamodules):
    with pytest.raises(FileNotFoundError, match=r"4 of 4 train shard\(s\) missing, .*; check data.shards"):
        make_datamodule(tmp_path).train_dataloader()
    shapes = datamodules(DataConfig(shards="data/shapes/train-999998.tar", val_shards=None), seed=0)
    with pytest.raises(FileNotFoundError, match="make_shapes"):
        shapes.train_dataloader()
    assert resolve_shard_urls(f"file:{tmp_path}/a.tar") == [f"{tmp_path}/a.tar"]
