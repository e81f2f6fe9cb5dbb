"""sd3train-caption with a tiny random LLaVA: one caption per key, task split, kill-and-rerun,
settings guard, bad shards, and training drawing the captions at data.p_synthetic."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from sd3train.curation.caption import main
from sd3train.data.caption_tables import CAPTION_INFO_NAME, read_table
from sd3train.data.tar_reader import RawSample, read_shard
from sd3train.data.tar_writer import EncodedImage, ShardSample, sha256_file, write_shards
from sd3train.durable import TEMP_MARK
from tests.support.photo_shards import photo_samples
from tests.support.processes import sigkill_while_feeding_fifo
from tests.support.tiny_vlm import save_tiny_vlm

SHARDS, PER_SHARD = 4, 200
BATCH = 16
BROKEN = 7  # this sample's JPEG is cut short: it cannot be captioned
SMALL = ((24, 24), (32, 16), (16, 32))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    samples = photo_samples(SHARDS * PER_SHARD, seed=0, synthetic=False, sizes=SMALL)
    broken = samples[BROKEN]
    samples[BROKEN] = ShardSample(broken.key, EncodedImage(broken.image.data[:100], "jpg"), broken.caption)
    folder = tmp_path_factory.mktemp("sources")
    write_shards(samples, folder, prefix="photos", samples_per_shard=PER_SHARD)
    return folder


def spec(folder: Path) -> str:
    return f"{folder}/photos-{{000000..{SHARDS - 1:06d}}}.tar"


def caption_args(vlm: Path, source: Path, out: Path, *flags: str) -> list[str]:
    return ["--shards", spec(source), "--model", str(vlm), "--out", str(out), "--batch-size", str(BATCH),
            "--max-new-tokens", "12", "--dtype", "fp32", "--device", "cpu", *flags]


def table_hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def reference(vlm, sources, tmp_path_factory) -> Path:
    """One uninterrupted single-task run."""
    out = tmp_path_factory.mktemp("reference")
    assert main(caption_args(vlm, sources, out)) == 0
    return out


def shard_keys(path: Path) -> list[str]:
    return [event.key for event in read_shard(str(path)) if isinstance(event, RawSample)]


# ------------------------------------------------------------------- content


def test_the_tiny_model_and_processor_round_trip_through_the_auto_classes(vlm):
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    processor = AutoProcessor.from_pretrained(vlm, local_files_only=True)
    assert isinstance(processor, LlavaProcessor) and processor.chat_template
    assert processor.tokenizer.decode(processor.tokenizer("a red circle").input_ids) == "a red circle"
    model = AutoModelForImageTextToText.from_pretrained(vlm, local_files_only=True)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert sum(parameter.numel() for parameter in model.parameters()) < 50_000


def test_one_caption_per_sample_key_in_shard_order(vlm, sources, reference, capsys):
    from sd3train.curation.vlm import CaptionModel

    model = CaptionModel.load(vlm, "cpu", "fp32", "Describe this image in detail.", 12)
    assert model.prompt == "USER: <image> Describe this image in detail. ASSISTANT:"  # through the chat template
    all_keys, all_captions = [], []
    for index in range(SHARDS):
        source = sources / f"photos-{index:06d}.tar"
        rows = [json.loads(line) for line in (reference / f"photos-{index:06d}.jsonl").read_text().splitlines()]
        keys = [key for key in shard_keys(source) if key != f"{BROKEN:09d}"]
        assert [row["key"] for row in rows] == keys  # every usable key once, in shard order
        all_keys += keys
        all_captions += [row["caption"] for row in rows]
        if index == 1:  # the captions are the model's greedy output for these images, in these batches
            images = [Image.open(io.BytesIO(event.fields["jpg"])).convert("RGB")
                      for event in read_shard(str(source)) if isinstance(event, RawSample)]
            expected = [caption for start in range(0, len(images), BATCH)
                        for caption in model.caption(images[start:start + BATCH])]
            assert [row["caption"] for row in rows] == expected
    assert len(all_keys) == len(set(all_keys)) == SHARDS * PER_SHARD - 1
    assert all(caption and caption == caption.strip() for caption in all_captions)
    assert len(set(all_captions)) > len(all_captions) // 4  # the captions depend on the image
    assert json.loads((reference / CAPTION_INFO_NAME).read_text()) == {
        "format": 1, "model": str(vlm.resolve()), "prompt": "Describe this image in detail.", "max_new_tokens": 12,
        "dtype": "fp32", "batch_size": BATCH, "image_key": "jpg;jpeg;png;webp",
    }
    assert not list(reference.glob(".*"))


def test_a_sample_that_cannot_be_captioned_is_counted_and_left_out(vlm, sources, tmp_path, capsys):
    assert main(caption_args(vlm, sources, tmp_path / "out", "--num-tasks", str(SHARDS))) == 0  # shard 0 only
    err = capsys.readouterr().err
    assert "199 captions, skipped 1 (decode_error 1)" in err, err
    assert f"{BROKEN:09d}" not in read_table(tmp_path / "out" / "photos-000000.jsonl")


def test_empty_captions_are_counted_not_written(sources, tmp_path, capsys):
    mute = save_tiny_vlm(tmp_path / "mute", mute=True)  # can only generate special tokens
    out = tmp_path / "out"
    assert main(caption_args(mute, sources, out, "--num-tasks", str(SHARDS))) == 0
    assert "0 captions, skipped 200 (decode_error 1, empty_caption 199)" in capsys.readouterr().err
    assert (out / "photos-000000.jsonl").read_bytes() == b""  # captioned, with nothing to keep


def test_a_processor_without_chat_template_gets_the_plain_prompt_after_its_image_token(tmp_path):
    from sd3train.curation.vlm import CaptionModel

    model = CaptionModel.load(save_tiny_vlm(tmp_path / "plain", chat_template=False), "cpu", "fp32", "describe this", 4)
    assert model.prompt == "<image>\ndescribe this"
    image = Image.new("RGB", (20, 12), (200, 30, 30))
    captions = model.caption([image, image])
    assert captions[0] and captions == model.caption([image, image])  # greedy: the same again


# ------------------------------------------------------------------- tasks


def test_two_tasks_write_the_same_tables_as_one(vlm, sources, reference, tmp_path):
    out = tmp_path / "split"
    assert main(caption_args(vlm, sources, out, "--num-tasks", "2", "--task-index", "1")) == 0
    assert sorted(table_hashes(out)) == ["photos-000001.jsonl", "photos-000003.jsonl"]
    assert main(caption_args(vlm, sources, out, "--num-tasks", "2", "--task-index", "0")) == 0
    assert len(table_hashes(reference)) == SHARDS
    assert table_hashes(out) == table_hashes(reference)
    assert (out / CAPTION_INFO_NAME).read_bytes() == (reference / CAPTION_INFO_NAME).read_bytes()


def test_killed_run_rerun_gives_the_uninterrupted_tables(vlm, sources, reference, tmp_path):
    """SIGKILL while the second table is half written; the rerun finishes with identical tables.

    The second shard is a FIFO this test feeds, so the kill lands at a known point: the first table
    is published and the second one's temporary file holds some rows.
    """
    source = tmp_path / "source"
    source.mkdir()
    for index in range(SHARDS):
        name = f"photos-{index:06d}.tar"
        if index == 1:
            os.mkfifo(source / name)
        else:
            shutil.copy(sources / name, source / name)
    out = tmp_path / "captions"
    log = tmp_path / "caption.log"
    command = [sys.executable, "-m", "sd3train.curation.caption", *caption_args(vlm, source, out)]
    second = (sources / "photos-000001.tar").read_bytes()

    def partial() -> list[Path]:
        return [path for path in out.glob(f".photos-000001.jsonl{TEMP_MARK}*") if path.stat().st_size > 0]

    sigkill_while_feeding_fifo(
        command, log, source / "photos-000001.tar",
        second[: len(second) // 2],  # about 100 of its 200 samples: several batches
        ready=lambda: (out / "photos-000000.jsonl").exists(), ready_what="the first table",
        fed=lambda: bool(partial()), fed_what="a partly written second table",
    )
    assert sorted(path.name for path in out.glob("*.jsonl")) == ["photos-000000.jsonl"]  # nothing partial in place
    assert partial()

    (source / "photos-000001.tar").unlink()
    shutil.copy(sources / "photos-000001.tar", source / "photos-000001.tar")
    assert main(caption_args(vlm, source, out)) == 0
    assert table_hashes(out) == table_hashes(reference)
    assert not list(out.glob(f".*{TEMP_MARK}*"))


# ---------------------------------------------------------------- refusals


def test_other_settings_than_the_folder_exit_2_naming_them(vlm, sources, tmp_path, capsys):
    out = tmp_path / "out"
    nothing = ("--num-tasks", str(SHARDS + 1), "--task-index", str(SHARDS))  # no shard: only caption_info.json
    assert main(caption_args(vlm, sources, out, *nothing)) == 0
    capsys.readouterr()
    assert main(caption_args(vlm, sources, out, "--prompt", "What is this?", "--dtype", "bf16", *nothing)) == 2
    err = capsys.readouterr().err
    assert 'prompt: the folder has "Describe this image in detail.", this run has "What is this?"' in err, err
    assert 'dtype: the folder has "fp32", this run has "bf16"' in err and "max_new_tokens" not in err
    # Padding can change a caption, so another batch size is another set of captions.
    assert main(caption_args(vlm, sources, out, "--batch-size", str(BATCH + 1), *nothing)) == 2
    assert f"batch_size: the folder has {BATCH}, this run has {BATCH + 1}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--model", "/nowhere/model"), "--model: /nowhere/model is not a folder"),
    (("--shards", "/data/a/x.tar::/data/b/x.tar"), "--shards: several shards would write the same caption table x.jsonl"),
    (("--shards", "pipe:cat /data/shard"), "--shards: cannot name"),
    (("--task-index", "2", "--num-tasks", "2"), "task index 2 is outside 0..1"),
])
def test_usage_errors_exit_2_naming_the_option(vlm, sources, tmp_path, capsys, flags, message):
    assert main(caption_args(vlm, sources, tmp_path / "out", *flags)) == 2
    assert message in capsys.readouterr().err


def test_a_model_folder_transformers_cannot_load_exits_2(sources, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(caption_args(tmp_path / "junk", sources, tmp_path / "out")) == 2
    assert "--model: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # argparse: a missing required option
        main(["--shards", spec(sources), "--out", str(tmp_path / "out")])
    assert caught.value.code == 2


def test_unreadable_or_truncated_shards_exit_1_and_get_no_table(vlm, sources, tmp_path, capsys):
    cut = tmp_path / "cut-000000.tar"
    data = (sources / "photos-000002.tar").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    shards = f"{sources}/photos-000003.tar::{tmp_path}/missing-000000.tar::{cut}"
    assert main(["--shards", shards, *caption_args(vlm, sources, out)[2:]]) == 1
    err = capsys.readouterr().err
    assert "missing-000000.jsonl: FAILED" in err and "cut-000000.jsonl: FAILED" in err, err
    assert table_hashes(out) == {"photos-000003.jsonl": table_hashes_of(sources, "photos-000003.jsonl", vlm, tmp_path)}
    assert not list(out.glob(".*"))


def table_hashes_of(sources: Path, name: str, vlm: Path, tmp_path: Path) -> str:
    out = tmp_path / "single"
    assert main(["--shards", str(sources / name.replace(".jsonl", ".tar")), *caption_args(vlm, sources, out)[2:]]) == 0
    return sha256_file(out / name)


# ------------------------------------------------------------ training reads them


def _synthetic_fraction(reference: Path, sources: Path, p_synthetic: float) -> tuple[float, int]:
    """(fraction of the epoch's captions that are the table's, samples) with data.synthetic_captions."""
    from sd3train.config.schema import DataConfig
    from sd3train.data.datamodule import ShardDataModule

    tables = {}
    for path in reference.glob("*.jsonl"):
        tables.update(read_table(path))
    datamodule = ShardDataModule(DataConfig(
        shards=spec(sources), val_shards=None, resolution=16, batch_size=50, num_workers=0, shuffle_buffer=0,
        synthetic_captions=str(reference), p_synthetic=p_synthetic, skip_budget_min_samples=0,
    ), seed=0)
    from_table = total = 0
    for batch in datamodule.train_dataloader():
        if datamodule.epoch > 0:
            break
        for key, caption, synthetic in zip(batch["keys"], batch["captions"], batch["synthetic_captions"]):
            assert caption == (tables[key] if synthetic else f"original caption {int(key)}"), key
            from_table += synthetic
            total += 1
        if total == SHARDS * PER_SHARD - 1:
            break
    return from_table / total, total


def test_training_draws_the_table_captions_at_p_synthetic(reference, sources):
    fraction, samples = _synthetic_fraction(reference, sources, 0.5)
    assert samples == SHARDS * PER_SHARD - 1  # the broken image is skipped by training too
    # Each sample's choice is an independent fair coin (a hash of seed, key, epoch): the fraction of
    # 799 has a standard deviation of 0.018; 4 of them allow any seed (this one measures 401 / 799 = 0.502).
    assert abs(fraction - 0.5) <= 4 * (0.25 / samples) ** 0.5, fraction
    assert _synthetic_fraction(reference, sources, 0.0)[0] == 0.0
    assert _synthetic_fraction(reference, sources, 1.0)[0] == 1.0  # every sample has a table caption


def test_precompute_embeds_the_table_caption_first_then_the_sample_sidecar(vlm, tmp_path):
    from sd3train.curation import precompute

    source = tmp_path / "source"
    write_shards(photo_samples(12, seed=1, sizes=((32, 32),)), source, prefix="few", samples_per_shard=12)  # syn.txt sidecars
    tables = tmp_path / "captions"
    assert main(["--shards", str(source / "few-000000.tar"), *caption_args(vlm, source, tables)[2:]]) == 0
    path = tables / "few-000000.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    dropped = json.loads(lines.pop(3))["key"]  # this sample falls back to its own synthetic caption
    path.write_text("".join(lines))
    table = read_table(path)
    cache = tmp_path / "cache"
    assert precompute.main(["--out", str(cache), "--batch-size", "4", "experiment=tiny_cpu", "data.resolution=32",
                            f"data.shards='{source}/few-000000.tar'", f"data.synthetic_captions={tables}",
                            "data.synthetic_caption_key=syn.txt"]) == 0
    entries = [event for event in read_shard(str(cache / "few-000000.tar")) if isinstance(event, RawSample)]
    assert len(entries) == 12
    for entry in entries:
        meta = json.loads(entry.fields["json"])
        expected = f"synthetic caption {int(entry.key)}" if entry.key == dropped else table[entry.key]
        assert meta["synthetic_caption"] == expected and "syn.safetensors" in entry.fields, entry.key
    assert json.loads((cache / "cache_info.json").read_text())["data"]["synthetic_captions"] == str(tables)
