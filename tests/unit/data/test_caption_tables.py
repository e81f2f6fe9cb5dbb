"""Caption tables (data.synthetic_captions) joined to samples by key: which caption a sample trains
with, the sidecar fallback, a shard without a table, sample-exact resume, and the config checks.

The tables here are written with `table_line` (the writer's own row format); the run of the real
captioning tool feeding training is in tests/unit/curation/test_caption.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest

from sd3train.config.schema import DataConfig
from sd3train.data.caption_tables import CAPTION_FORMAT, CAPTION_INFO_NAME, SYNTHETIC_FIELD, read_table, table_line
from sd3train.data.captions import use_synthetic
from sd3train.data.datamodule import ShardDataModule
from tests.support.config import compose_config
from tests.support.photo_shards import write_photo_shards

NUM_PHOTOS, PER_SHARD = 120, 30  # 4 shards; keys 000000000..000000119


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, str]:
    """Photos with `syn.txt` sidecars ("synthetic caption N"), small: these tests are about captions."""
    folder = tmp_path_factory.mktemp("photos")
    return folder, write_photo_shards(folder, NUM_PHOTOS, PER_SHARD, sizes=((24, 24), (32, 16)))


def table_caption(index: int) -> str:
    return f"table caption {index}"


def write_tables(folder: Path, shards: range = range(4), keep=lambda index: index % 2 == 0) -> Path:
    """Tables for `shards` holding the kept keys (even ones by default), as sd3train-caption lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CAPTION_INFO_NAME).write_text(json.dumps({"format": CAPTION_FORMAT, "model": "hand-written"}))
    for shard in shards:
        rows = [table_line(f"{index:09d}", table_caption(index))
                for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD) if keep(index)]
        (folder / f"photos-{shard:06d}.jsonl").write_bytes(b"".join(rows))
    return folder


@pytest.fixture
def make_datamodule(datamodules) -> Callable[..., ShardDataModule]:
    def make(shards: str, **overrides) -> ShardDataModule:
        fields = dict(shards=shards, val_shards=None, resolution=16, aspect_buckets=False, batch_size=10, num_workers=0,
                      shuffle_buffer=0, p_synthetic=1.0, skip_budget_min_samples=0)
        fields.update(overrides)
        return datamodules(DataConfig(**fields), seed=0)

    return make


def captions_by_key(datamodule: ShardDataModule) -> dict[int, tuple[str, bool]]:
    """key -> (caption, synthetic) over the datamodule's next epoch."""
    seen = {}
    for batch in datamodule.train_dataloader():
        if datamodule.epoch > 0:
            break
        for key, caption, synthetic in zip(batch["keys"], batch["captions"], batch["synthetic_captions"]):
            seen[int(key)] = (caption, synthetic)
        if len(seen) == NUM_PHOTOS:
            break
    return seen


def test_table_rows_are_one_json_object_per_line_read_back_by_key(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(table_line("a/1", "ein Bild\nmit Umlaut ä") + table_line("a/2", "two") + table_line("a/1", "again"))
    assert path.read_bytes().splitlines()[1] == b'{"caption": "two", "key": "a/2"}'
    assert read_table(path) == {"a/1": "ein Bild\nmit Umlaut ä", "a/2": "two"}  # the first row of a key wins


def test_table_caption_comes_first_and_the_sidecar_fills_the_gaps(photos, tmp_path, make_datamodule):
    _, shards = photos
    tables = write_tables(tmp_path / "captions")
    with_sidecar = captions_by_key(make_datamodule(shards, synthetic_captions=str(tables), synthetic_caption_key="syn.txt"))
    assert len(with_sidecar) == NUM_PHOTOS
    for index, (caption, synthetic) in with_sidecar.items():
        assert synthetic
        assert caption == (table_caption(index) if index % 2 == 0 else f"synthetic caption {index}"), index
    table_only = captions_by_key(make_datamodule(shards, synthetic_captions=str(tables)))
    for index, (caption, synthetic) in table_only.items():  # the sidecar is not read without synthetic_caption_key
        assert (caption, synthetic) == ((table_caption(index), True) if index % 2 == 0
                                        else (f"original caption {index}", False)), index


def test_the_mix_picks_the_table_caption_by_seed_key_and_epoch(photos, tmp_path, make_datamodule):
    _, shards = photos
    tables = write_tables(tmp_path / "captions", keep=lambda index: True)
    seen = captions_by_key(make_datamodule(shards, synthetic_captions=str(tables), p_synthetic=0.5))
    chosen = {index for index, (_, synthetic) in seen.items() if synthetic}
    assert chosen == {index for index in range(NUM_PHOTOS) if use_synthetic(0, f"{index:09d}", 0, 0.5)}
    assert all(caption == (table_caption(index) if index in chosen else f"original caption {index}")
               for index, (caption, _) in seen.items())
    assert 0.35 < len(chosen) / NUM_PHOTOS < 0.65, len(chosen)  # 120 draws: 3 standard deviations


def test_a_shard_without_a_table_keeps_its_own_captions_after_a_warning(photos, tmp_path, caplog, make_datamodule):
    _, shards = photos
    tables = write_tables(tmp_path / "captions", shards=range(3), keep=lambda index: True)  # none for shard 3
    datamodule = make_datamodule(shards, synthetic_captions=str(tables))
    with caplog.at_level(logging.WARNING, logger="sd3train.data"):
        seen = captions_by_key(datamodule)
    assert all(seen[index] == (table_caption(index), True) for index in range(90))
    assert all(seen[index] == (f"original caption {index}", False) for index in range(90, 120))
    assert "1 of 4 train shard(s) have no caption table" in caplog.text
    assert "photos-000003.jsonl" in caplog.text


def test_resume_is_sample_exact_with_caption_tables_and_two_workers(photos, tmp_path, make_datamodule):
    _, shards = photos
    tables = write_tables(tmp_path / "captions")
    settings = dict(synthetic_captions=str(tables), synthetic_caption_key="syn.txt", p_synthetic=0.5, num_workers=2,
                    shuffle_buffer=20, batch_size=8, aspect_buckets=True, resolution=32)

    def batches(datamodule, count):
        return [(batch["keys"], batch["captions"]) for batch in islice(datamodule.train_dataloader(), count)]

    reference = batches(make_datamodule(shards, **settings), 24)  # an epoch is about 16 batches
    for stop_after in (3, 19):
        interrupted = make_datamodule(shards, **settings)
        assert batches(interrupted, stop_after) == reference[:stop_after]
        state = interrupted.state_dict()
        assert state["stream"]["synthetic_captions"] == str(tables)
        resumed = make_datamodule(shards, **settings)
        resumed.load_state_dict(state)
        assert batches(resumed, 24 - stop_after) == reference[stop_after:], stop_after
    with pytest.raises(ValueError, match="data.synthetic_captions: checkpoint"):
        make_datamodule(shards, **{**settings, "synthetic_captions": None}).load_state_dict(state)


def test_a_checkpoint_from_before_caption_tables_still_resumes(photos, make_datamodule):
    _, shards = photos
    interrupted = make_datamodule(shards)
    list(islice(interrupted.train_dataloader(), 2))
    state = interrupted.state_dict()
    del state["stream"]["synthetic_captions"]  # what a checkpoint written before the field holds
    resumed = make_datamodule(shards)
    resumed.load_state_dict(state)
    assert resumed.batches_consumed == 2


def test_no_tar_member_can_take_the_joined_field_name():
    from sd3train.data.tar_reader import split_member_name

    assert "/" in SYNTHETIC_FIELD  # an extension is taken from the basename: it never holds a '/'
    for name in (f"000001.{SYNTHETIC_FIELD}", f"a/000001.{SYNTHETIC_FIELD}", "sd3train/000001.synthetic_caption"):
        parsed = split_member_name(name)
        assert parsed is None or parsed[1] != SYNTHETIC_FIELD, name


# ----------------------------------------------------------------- config checks


def _load(*overrides: str):
    return compose_config("experiment=tiny_cpu", "trainer.accelerator=cpu", *overrides)


def test_config_accepts_a_caption_folder_and_refuses_bad_ones_naming_them(photos, tmp_path):
    from sd3train.config.typed import ConfigError

    folder, _ = photos
    shards = f"data.shards='{folder}/photos-{{000000..000003}}.tar'"
    tables = write_tables(tmp_path / "captions")
    cfg = _load(shards, f"data.synthetic_captions={tables}", "data.synthetic_caption_key=syn.txt")
    assert cfg.data.synthetic_captions == str(tables)
    assert _load(shards).data.synthetic_captions is None  # the default
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / CAPTION_INFO_NAME).write_text(json.dumps({"format": CAPTION_FORMAT}))
    for overrides, message in (
        ([f"data.synthetic_captions={tmp_path}/nowhere"], "is not a folder"),
        ([f"data.synthetic_captions={tmp_path}/empty"], f"has no readable {CAPTION_INFO_NAME}"),
        ([f"data.synthetic_captions={tmp_path}/other"], "has a caption table for none of the 4 train shard(s)"),
        ([f"data.shards='{folder}/photos-000000.tar::{tmp_path}/photos-000000.tar'", f"data.synthetic_captions={tables}"],
         "several train shards share the file name of caption table photos-000000.jsonl"),
    ):
        with pytest.raises(ConfigError) as caught:
            _load(shards, *overrides)
        assert "data.synthetic_captions: " in str(caught.value) and message in str(caught.value), str(caught.value)
