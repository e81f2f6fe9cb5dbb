"""The streaming pipeline's guarantees: every sample once per epoch across ranks x workers, one bucket
shape per batch, a reproducible 50/50 caption mix, and sample-exact resume (2 workers; 2 ranks in
real processes)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from itertools import islice

import pytest
import torch
import torch.multiprocessing as mp

from sd3train.config.schema import DataConfig
from sd3train.data.datamodule import ShardDataModule
from tests.support.photo_shards import PHOTO_SIZES, write_photo_shards

NUM_PHOTOS, PER_SHARD, BATCH = 240, 30, 8
RESOLUTION = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return write_photo_shards(tmp_path_factory.mktemp("photos"), NUM_PHOTOS, PER_SHARD)


def data_config(shards: str, **overrides) -> DataConfig:
    fields = dict(
        shards=shards, val_shards=None, resolution=RESOLUTION, aspect_buckets=True, batch_size=BATCH,
        num_workers=2, shuffle_buffer=50, synthetic_caption_key="syn.txt", p_synthetic=0.5,
        skip_budget_min_samples=0,
    )
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture
def make_datamodule(datamodules) -> Callable[..., ShardDataModule]:
    def make(shards: str, seed: int = 0, **overrides) -> ShardDataModule:
        return datamodules(data_config(shards, **overrides), seed=seed)

    return make


def epochs(datamodule: ShardDataModule, count: int) -> list[list[dict]]:
    """The batches of the next `count` epochs, split by the epoch each batch belongs to."""
    first = datamodule.epoch
    split: list[list[dict]] = [[] for _ in range(count)]
    for batch in datamodule.train_dataloader():
        if datamodule.epoch - first == count:
            break
        split[datamodule.epoch - first].append(batch)
    return split


def one_epoch(datamodule: ShardDataModule) -> list[dict]:
    return epochs(datamodule, 1)[0]


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(photos, monkeypatch, make_datamodule):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for epoch in range(2):
        keys = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            datamodule = make_datamodule(photos)
            datamodule.position.epoch = epoch
            keys += [key for batch in one_epoch(datamodule) for key in batch["keys"]]
        assert sorted(keys) == [f"{index:09d}" for index in range(NUM_PHOTOS)], f"epoch {epoch}"


def test_each_batch_is_one_bucket_shape_near_the_target_area(photos, make_datamodule):
    datamodule = make_datamodule(photos)
    shapes = Counter()
    for batch in one_epoch(datamodule):
        images = batch["images"]
        height, width = images.shape[-2:]
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width - RESOLUTION**2) <= 0.1 * RESOLUTION**2
        shapes[(height, width)] += len(batch["keys"])
        # Original sizes are kept per sample and match the photo the key was made from.
        assert all(tuple(size) in {(h, w) for w, h in PHOTO_SIZES} for size in batch["original_sizes"].tolist())
    assert len(shapes) >= 3, shapes  # landscape, portrait and square photos land in different buckets
    assert sum(shapes.values()) == NUM_PHOTOS


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> str:
    # Small images: this test is about captions.
    return write_photo_shards(tmp_path_factory.mktemp("many"), 2000, 250, sizes=((24, 24), (32, 16)))


def _synthetic_choices(make_datamodule, shards: str) -> dict[str, bool]:
    datamodule = make_datamodule(shards, num_workers=0, batch_size=50, shuffle_buffer=0, resolution=16)
    choices = {}
    for batch in one_epoch(datamodule):
        for key, caption, synthetic in zip(batch["keys"], batch["captions"], batch["synthetic_captions"]):
            assert caption == (f"synthetic caption {int(key)}" if synthetic else f"original caption {int(key)}")
            choices[key] = synthetic
    return choices


def test_caption_mix_is_half_synthetic_and_identical_across_reruns(many_photos, make_datamodule):
    first = _synthetic_choices(make_datamodule, many_photos)
    assert len(first) == 2000
    fraction = sum(first.values()) / len(first)
    assert abs(fraction - 0.5) <= 0.05, fraction
    assert _synthetic_choices(make_datamodule, many_photos) == first


def test_caption_choice_changes_with_the_epoch(photos, make_datamodule):
    choices = [
        {key: synthetic for batch in batches for key, synthetic in zip(batch["keys"], batch["synthetic_captions"])}
        for batches in epochs(make_datamodule(photos, num_workers=0), 2)
    ]
    first, second = choices
    assert first.keys() == second.keys() and first != second


def _keys(batches) -> list[list[str]]:
    return [batch["keys"] for batch in batches]


@pytest.mark.parametrize("stop_after", [1, 4, 9, 17, 30, 41])
def test_resume_after_k_batches_yields_the_uninterrupted_sequence_with_two_workers(photos, stop_after, make_datamodule):
    # 240 photos in uneven buckets: workers form different numbers of batches, epochs end with
    # partial batches, and k = 30, 41 fall in the second epoch.
    total = 50
    reference = _keys(islice(make_datamodule(photos).train_dataloader(), total))
    interrupted = make_datamodule(photos)
    assert _keys(islice(interrupted.train_dataloader(), stop_after)) == reference[:stop_after]
    state = interrupted.state_dict()
    resumed = make_datamodule(photos)
    resumed.load_state_dict(state)
    assert _keys(islice(resumed.train_dataloader(), total - stop_after)) == reference[stop_after:]


def test_resume_keeps_the_decode_failures_it_had_seen(tmp_path, make_datamodule):
    from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards
    from tests.support.photo_shards import photo_samples

    samples = photo_samples(60, seed=3)
    broken = samples[5]
    samples[5] = ShardSample(broken.key, EncodedImage(broken.image.data[:200], "jpg"), broken.caption, None, broken.sidecars)
    write_shards(samples, tmp_path, prefix="p", samples_per_shard=15)
    shards = f"{tmp_path}/p-{{000000..000003}}.tar"
    reference = _keys(islice(make_datamodule(shards).train_dataloader(), 12))
    for stop_after in (2, 5):
        interrupted = make_datamodule(shards)
        list(islice(interrupted.train_dataloader(), stop_after))
        resumed = make_datamodule(shards)
        resumed.load_state_dict(interrupted.state_dict())
        assert _keys(islice(resumed.train_dataloader(), 12 - stop_after)) == reference[stop_after:]
    assert all(broken.key not in keys for keys in reference)


def test_resume_with_another_worker_count_is_refused_naming_it_unless_resplit(photos, make_datamodule):
    interrupted = make_datamodule(photos)
    list(islice(interrupted.train_dataloader(), 3))
    state = interrupted.state_dict()
    with pytest.raises(ValueError, match=r"data.num_workers: checkpoint 2, now 1"):
        make_datamodule(photos, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.batch_size: checkpoint 8, now 4"):
        make_datamodule(photos, batch_size=4).load_state_dict(state)
    resplit = make_datamodule(photos, num_workers=1, resume_resplit=True)
    resplit.load_state_dict(state)
    assert resplit.epoch == 1 and resplit.batches_consumed == 3
    next(iter(resplit.train_dataloader()))


def _two_rank_worker(rank: int, shards: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # In-process loading (workers are covered above); a rank's epoch is about 17 batches, so
        # the 24 cross into epoch 1 (keys repeat).
        total, stop_after = 24, 6
        cfg = data_config(shards, num_workers=0)  # no fixture in this process, and no workers to tear down
        reference = _keys(islice(ShardDataModule(cfg, seed=0).train_dataloader(), total))
        interrupted = ShardDataModule(cfg, seed=0)
        list(islice(interrupted.train_dataloader(), stop_after))
        state = interrupted.state_dict()  # gathers both ranks' cursors
        if rank == 0:
            torch.save(state, out)
        torch.distributed.barrier()
        resumed = ShardDataModule(cfg, seed=0)
        resumed.load_state_dict(torch.load(out, weights_only=False))  # every rank reads rank 0's file
        continued = _keys(islice(resumed.train_dataloader(), total - stop_after))
        torch.save({"reference": reference, "continued": continued, "ranks": len(state["ranks"])}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_resume_is_exact_on_two_ranks_in_separate_processes(photos, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = str(tmp_path / "state.pt")
    mp.start_processes(_two_rank_worker, args=(photos, port, out), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]
    for result in results:
        assert result["ranks"] == 2
        assert result["continued"] == result["reference"][6:]
        assert len({key for keys in result["reference"] for key in keys}) < sum(map(len, result["reference"]))
        assert len({key for keys in result["reference"] for key in keys}) < sum(map(len, result["reference"]))
    # Within epoch 0 the two ranks read different samples.
    keys = [{key for keys in result["reference"][:6] for key in keys} for result in results]
    assert not keys[0] & keys[1]



def test_resume_is_exact_when_keys_repeat_across_shard_sets_and_one_copy_is_corrupt(tmp_path, make_datamodule):
    # Two datasets numbered from 0 (as sd3train-shards and img2dataset number them), mixed in one
    # list; key 000000003 is corrupt in the first and fine in the second.
    from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards
    from tests.support.photo_shards import photo_samples

    first = photo_samples(40, seed=1)
    broken = first[3]
    first[3] = ShardSample(broken.key, EncodedImage(broken.image.data[:300], "jpg"), broken.caption, None, broken.sidecars)
    write_shards(first, tmp_path, prefix="a", samples_per_shard=10)
    write_shards(photo_samples(40, seed=2), tmp_path, prefix="b", samples_per_shard=10)
    shards = f"{tmp_path}/a-{{000000..000003}}.tar::{tmp_path}/b-{{000000..000003}}.tar"
    reference = _keys(islice(make_datamodule(shards).train_dataloader(), 16))
    assert sum(keys.count("000000003") for keys in reference) >= 1  # the good copy is trained on
    for stop_after in range(1, 12):
        interrupted = make_datamodule(shards)
        list(islice(interrupted.train_dataloader(), stop_after))
        resumed = make_datamodule(shards)
        resumed.load_state_dict(interrupted.state_dict())
        assert _keys(islice(resumed.train_dataloader(), 16 - stop_after)) == reference[stop_after:], stop_after


def test_counts_after_a_resume_equal_the_uninterrupted_counts(tmp_path, make_datamodule):
    from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards
    from tests.support.photo_shards import photo_samples

    samples = photo_samples(26, seed=4)
    for index in (2, 25):  # one early, one after the last full batch (counted in the epoch's tail)
        bad = samples[index]
        samples[index] = ShardSample(bad.key, EncodedImage(bad.image.data[:300], "jpg"), bad.caption, None, bad.sidecars)
    write_shards(samples, tmp_path, prefix="c", samples_per_shard=26)
    shards = f"{tmp_path}/c-000000.tar"
    settings = dict(num_workers=0, shuffle_buffer=0, aspect_buckets=False, drop_partial_batches=True, skip_budget=1.0)

    def counts_after(batches: int, stop_after: int | None = None) -> tuple[int, dict]:
        datamodule = make_datamodule(shards, **settings)
        if stop_after is not None:
            list(islice(datamodule.train_dataloader(), stop_after))
            state = datamodule.state_dict()
            datamodule = make_datamodule(shards, **settings)
            datamodule.load_state_dict(state)
            batches -= stop_after
        list(islice(datamodule.train_dataloader(), batches))
        return datamodule.samples_read, dict(datamodule.skipped)

    straight = counts_after(4)  # 3 batches of 8 in epoch 0, then the first of epoch 1
    assert straight[1] == {"decode_error": 3}  # 2 in epoch 0, 1 early in epoch 1
    for stop_after in (1, 3):
        assert counts_after(4, stop_after) == straight, stop_after


def test_a_changed_shard_after_the_checkpoint_is_detected_on_resume(tmp_path, make_datamodule):
    from sd3train.data.stream import DataResumeError
    from sd3train.data.tar_writer import write_shards
    from tests.support.photo_shards import photo_samples

    write_shards(photo_samples(48, seed=5), tmp_path, prefix="d", samples_per_shard=12)
    shards = f"{tmp_path}/d-{{000000..000003}}.tar"
    interrupted = make_datamodule(shards)
    list(islice(interrupted.train_dataloader(), 4))
    state = interrupted.state_dict()
    write_shards(photo_samples(48, seed=6), tmp_path, prefix="d", samples_per_shard=12)  # other samples
    resumed = make_datamodule(shards)
    resumed.load_state_dict(state)
    with pytest.raises(DataResumeError, match="not the one the checkpoint recorded"):
        next(iter(resumed.train_dataloader()))
