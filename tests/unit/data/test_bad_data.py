"""Bad data through ShardDataModule: exact skip counts per reason, the budget, all-bad sets, rate-limited logs.

Shard sets are written by hand (the project's `write_shards`, Python's `tarfile`) so every skip is
known in advance: a truncated shard, a corrupt JPEG, a sample without caption, a duplicate key.
"""

from __future__ import annotations

import gc
import io
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sd3train.config.schema import DataConfig
from sd3train.data.datamodule import ShardDataModule
from sd3train.data.skips import DataBudgetError, reset_skip_log
from sd3train.data.tar_writer import write_shards
from tests.support.photo_shards import jpeg_bytes, photo_samples, write_photo_shards

BATCH = 4
Members = list[tuple[str, bytes]]


# ------------------------------------------------------------------ shard builders


def write_tar(path: Path, members: Members) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def good_members(key: str, seed: int, size: tuple[int, int] = (64, 64)) -> Members:
    return [(f"{key}.jpg", jpeg_bytes(*size, seed=seed)), (f"{key}.txt", f"caption {key}".encode())]


def corrupt_jpeg(seed: int) -> bytes:
    """A JPEG whose header reads (so it is bucketed) but whose data ends half-way: PIL raises on decode."""
    data = jpeg_bytes(64, 64, seed=seed)
    return data[: len(data) // 2]


def write_truncated_shard(folder: Path, prefix: str, count: int, cut_in: int, start: int) -> list[str]:
    """A good shard by `write_shards`, cut in the middle of the 2nd member of sample `cut_in`.

    Returns the keys that survive: the samples before `cut_in` (completed when `cut_in`'s header
    was read); sample `cut_in` is pending when the data ends and is dropped.
    """
    samples = photo_samples(count, seed=7, synthetic=False, start=start)
    write_shards(samples, folder, prefix=prefix, samples_per_shard=count)
    path = folder / f"{prefix}-000000.tar"
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(samples[cut_in].key + ".")]
    member = members[1]
    assert member.size > 2
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])
    return [sample.key for sample in samples[:cut_in]]


def bad_set(folder: Path) -> tuple[str, list[str]]:
    """4 good shards of 8, a truncated shard (4 survivors), and a mixed shard with 6 good samples,
    one corrupt JPEG, one sample without caption and one duplicate key.

    Per reason: truncated_shard 1, decode_error 1, no_caption 1, duplicate_key 1; 42 good keys.
    Returns (shard spec, good keys).
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = photo_samples(32, seed=3, synthetic=False)
    write_shards(good, folder, prefix="good", samples_per_shard=8)
    survivors = write_truncated_shard(folder, "cut", count=8, cut_in=4, start=1000)
    mixed = [f"mix{i}" for i in range(6)]
    members: Members = []
    for i, key in enumerate(mixed[:3]):
        members += good_members(key, seed=2000 + i)
    members += [("badjpeg.jpg", corrupt_jpeg(1)), ("badjpeg.txt", b"a corrupt image")]
    members += [("nocap.jpg", jpeg_bytes(64, 64, seed=5)), ("nocap.json", b'{"status": "success"}')]
    for i, key in enumerate(mixed[3:]):
        members += good_members(key, seed=2003 + i)
    # mix1 again after other keys: the later group is dropped, the first one kept.
    members += [("mix1.jpg", jpeg_bytes(64, 64, seed=99)), ("mix1.txt", b"a duplicate")]
    write_tar(folder / "mixed-000000.tar", members)
    spec = f"{folder}/good-{{000000..000003}}.tar::{folder}/cut-000000.tar::{folder}/mixed-000000.tar"
    return spec, [s.key for s in good] + survivors + mixed


def data_config(spec: str, **overrides) -> DataConfig:
    fields = dict(
        shards=spec, val_shards=None, resolution=32, batch_size=BATCH, num_workers=0, shuffle_buffer=10,
        skip_budget=0.2, skip_budget_min_samples=20,
    )
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture
def datamodule_for(datamodules) -> Callable[..., ShardDataModule]:
    def make(spec: str, **overrides) -> ShardDataModule:
        return datamodules(data_config(spec, **overrides), seed=0)

    return make


def one_epoch(datamodule: ShardDataModule) -> tuple[list[str], Counter, dict[str, float]]:
    """Keys of epoch 0's batches, the skip counts of epoch 0 and its samples read and skipped fraction.

    Iterates until the first batch of epoch 1 is consumed (a worker's counts after its last batch
    arrive just before it), then takes away what that first batch carried, measured on a fresh
    datamodule that starts at epoch 1 (the stream is deterministic).
    """
    keys: list[str] = []
    for batch in datamodule.train_dataloader():
        if datamodule.epoch != 0:
            break
        keys += batch["keys"]
    datamodule.teardown("fit")
    probe = ShardDataModule(datamodule.cfg, seed=datamodule.seed)
    probe.position.epoch = 1
    try:
        next(iter(probe.train_dataloader()))
    finally:
        probe.teardown("fit")
    skipped = Counter(datamodule.skipped)
    skipped.subtract(probe.skipped)
    skipped = +skipped  # drop zero counts
    read = datamodule.samples_read - probe.samples_read
    metrics = {"data/samples_read": float(read), "data/skipped_fraction": sum(skipped.values()) / max(1, read)}
    return keys, skipped, metrics


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_of_a_bad_set_counts_each_problem_once_and_yields_every_good_key_once(
    tmp_path, num_workers, datamodule_for
):
    spec, good_keys = bad_set(tmp_path / "shards")
    assert len(good_keys) == 42
    datamodule = datamodule_for(spec, num_workers=num_workers)
    keys, skipped, metrics = one_epoch(datamodule)
    assert dict(skipped) == {"truncated_shard": 1, "decode_error": 1, "no_caption": 1, "duplicate_key": 1}
    assert Counter(keys) == Counter(good_keys)  # each good key exactly once, nothing else
    assert "badjpeg" not in keys and "nocap" not in keys
    # 42 samples + 4 problems read; the logged counters say the same.
    assert metrics["data/samples_read"] == 46.0
    assert metrics["data/skipped_fraction"] == pytest.approx(4 / 46)


def corrupt_set(folder: Path, good: int, bad: int) -> tuple[str, Path]:
    """One good shard and one shard of `bad` corrupt JPEGs; returns (spec, bad shard path)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(photo_samples(good, seed=4, synthetic=False), folder, prefix="good", samples_per_shard=good)
    members: Members = []
    for i in range(bad):
        members += [(f"bad{i:03d}.jpg", corrupt_jpeg(i)), (f"bad{i:03d}.txt", b"corrupt")]
    bad_path = write_tar(folder / "bad-000000.tar", members)
    return f"{folder}/good-000000.tar::{bad_path}", bad_path


def test_more_bad_samples_than_the_budget_stop_the_run_naming_budget_and_worst_shard(tmp_path, datamodule_for):
    spec, bad_path = corrupt_set(tmp_path, good=20, bad=10)
    datamodule = datamodule_for(spec, skip_budget=0.05, skip_budget_min_samples=0)
    with pytest.raises(DataBudgetError) as caught:
        for _ in datamodule.train_dataloader():
            pass
    message = str(caught.value)
    assert "data.skip_budget of 5.00%" in message
    assert f"the worst shard is {bad_path} with" in message
    assert "decode_error" in message


def test_budget_is_checked_on_the_rank_totals_with_two_workers(tmp_path, datamodule_for):
    spec, bad_path = corrupt_set(tmp_path, good=20, bad=10)
    # 2 shards, 2 workers: one worker reads only the corrupt shard and trips the budget.
    datamodule = datamodule_for(spec, skip_budget=0.05, skip_budget_min_samples=0, num_workers=2)
    with pytest.raises(DataBudgetError) as caught:
        for _ in datamodule.train_dataloader():
            pass
    message = str(caught.value)
    assert "on rank 0" in message  # counted in the main process from the workers' reports
    assert "data.skip_budget of 5.00%" in message
    assert f"the worst shard is {bad_path} with" in message


def all_bad_shard(tmp_path) -> Path:
    """One shard of 6 corrupt JPEGs with captions."""
    members: Members = []
    for i in range(6):
        members += [(f"bad{i}.jpg", corrupt_jpeg(i)), (f"bad{i}.txt", b"corrupt")]
    return write_tar(tmp_path / "allbad-000000.tar", members)


def test_a_set_where_every_sample_is_bad_raises_the_budget_error_even_below_min_samples(tmp_path, datamodule_for):
    path = all_bad_shard(tmp_path)
    # The shipped defaults: 5% of at least 1000 samples; 6 bad of 6 read still stops the run.
    datamodule = datamodule_for(str(path), skip_budget=0.05, skip_budget_min_samples=1000)
    with pytest.raises(DataBudgetError) as caught:
        next(iter(datamodule.train_dataloader()))
    message = str(caught.value)
    assert message.startswith("6 of 6 samples read (100.00%) were bad")
    assert "decode_error 6" in message and f"the worst shard is {path} with 6 skipped" in message


def test_all_bad_under_a_disabled_budget_says_no_batch_and_what_was_skipped(tmp_path, datamodule_for):
    """skip_budget=1.0 turns the budget off; an epoch without a batch must still say why."""
    path = all_bad_shard(tmp_path)
    datamodule = datamodule_for(str(path), skip_budget=1.0, skip_budget_min_samples=0)
    with pytest.raises(RuntimeError, match="epoch 0 gave no batch of 4") as caught:
        next(iter(datamodule.train_dataloader()))
    message = str(caught.value)
    assert not isinstance(caught.value, DataBudgetError)
    assert str(path) in message
    # The samples skipped in an epoch that formed no batch must reach the message (6 decode errors),
    # not "skipped so far: none".
    skipped = message.split("skipped so far:")[1]
    assert "decode_error" in skipped and "6" in skipped, message


def test_skips_after_a_workers_last_batch_are_counted(tmp_path, datamodule_for):
    """4 good samples fill one batch; the corrupt sample read after them rides on no batch."""
    members: Members = []
    for i in range(4):
        members += good_members(f"ok{i}", seed=i)
    members += [("zbad.jpg", corrupt_jpeg(0)), ("zbad.txt", b"corrupt")]
    path = write_tar(tmp_path / "tail-000000.tar", members)
    datamodule = datamodule_for(str(path), shuffle_buffer=0, skip_budget=1.0, skip_budget_min_samples=0)
    keys, skipped, metrics = one_epoch(datamodule)
    assert sorted(keys) == ["ok0", "ok1", "ok2", "ok3"]
    assert dict(skipped) == {"decode_error": 1}


def test_skip_warnings_are_rate_limited_and_name_shard_and_key(tmp_path, caplog, datamodule_for):
    spec, bad_path = corrupt_set(tmp_path, good=8, bad=50)
    datamodule = datamodule_for(spec, shuffle_buffer=0, skip_budget=1.0, skip_budget_min_samples=0)
    reset_skip_log()  # the rate limit counts per process, across tests
    with caplog.at_level(logging.WARNING, logger="sd3train.data"):
        keys, skipped, metrics = one_epoch(datamodule)
    assert skipped["decode_error"] == 50 and len(keys) == 8
    lines = [r for r in caplog.records if r.name == "sd3train.data" and r.levelno == logging.WARNING]
    # The 1st..5th and the 10th skip of a reason are logged; the 20th..50th are not.
    assert len(lines) == 6, [r.getMessage() for r in lines]
    expected_keys = [f"bad{i:03d}" for i in (0, 1, 2, 3, 4, 9)]
    for record, key in zip(lines, expected_keys):
        message = record.getMessage()
        assert "decode_error" in message and str(bad_path) in message and f"key {key}" in message, message


def test_teardown_stops_the_persistent_workers_at_once(tmp_path):
    """After fit, Lightning calls `datamodule.teardown("fit")`; the 2 persistent workers must stop then.

    Left to the cyclic garbage collector (when a reference cycle holds the datamodule), torch's
    worker shutdown waits 5 s per worker for a stop signal that never arrives.
    """
    shards = write_photo_shards(tmp_path, count=40, per_shard=10)
    datamodule = ShardDataModule(data_config(shards, num_workers=2, shuffle_buffer=1000), seed=0)  # deleted below
    next(iter(datamodule.train_dataloader()))
    datamodule.teardown("fit")
    del datamodule
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 3.0


def test_lost_shards_have_a_budget_of_their_own(tmp_path, datamodule_for):
    write_shards(photo_samples(44, seed=7), tmp_path, prefix="ok", samples_per_shard=2)  # 22 shards
    junk = []
    for index in range(3):  # 3 of 25 shards unreadable: 12%
        (tmp_path / f"junk-{index}.tar").write_bytes(b"not a tar file at all" * 40)
        junk.append(f"{tmp_path}/junk-{index}.tar")
    spec = "::".join([f"{tmp_path}/ok-{{000000..000021}}.tar", *junk])
    datamodule = datamodule_for(spec, skip_budget=0.05, skip_budget_min_samples=1000)
    with pytest.raises(DataBudgetError, match=r"3 of 2[0-9] shards opened .* could not be read to the end"):
        for _ in datamodule.train_dataloader():
            pass
