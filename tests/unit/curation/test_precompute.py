"""sd3train-precompute: cache content, task split, kill-and-rerun, settings guard, Slurm defaults."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from sd3train.checkpoint.components import text_conditioner_from_config, vae_from_config
from sd3train.curation import precompute
from sd3train.curation.encode_shard import _Item, _SourceOrderBatcher
from sd3train.curation.precompute import (
    UsageError,
    compose_or_usage_error,
    main,
    output_name,
    resolve_task,
)
from sd3train.data.cache_format import CACHE_INFO_NAME, DTYPES, TEXT_OUTPUTS
from sd3train.data.datamodule import build_decoder
from sd3train.data.decoders import Skip
from sd3train.data.tar_reader import RawSample, read_shard
from sd3train.data.tar_writer import EncodedImage, ShardSample, sha256_file, write_shards
from sd3train.durable import TEMP_MARK
from sd3train.tools.make_shapes import build_shapes
from tests.support.processes import sigkill_while_feeding_fifo

TRAIN = 4  # shapes train shards of 16 samples each
BATCH = 4  # small batches, so a shard is several batches (the kill test needs that)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _mixed_samples() -> list[ShardSample]:
    """Three aspect buckets interleaved, some synthetic captions, and one sample of each skip kind."""
    rng = np.random.RandomState(0)
    sizes = [(64, 64), (96, 64), (64, 96), (80, 48), (64, 64), (96, 64), (48, 80), (64, 64), (96, 64), (64, 96)]
    samples = []
    for index, (width, height) in enumerate(sizes):
        pixels = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
        sidecars = {"syn.txt": f"synthetic caption {index}".encode()} if index % 3 == 0 else None
        samples.append(ShardSample(f"s{index:03d}", EncodedImage(_png(pixels), "png"), f"caption {index}",
                                   None, sidecars))
        if index == 2:
            samples.append(ShardSample("broken", EncodedImage(b"not a png", "png"), "a caption"))
        if index == 5:
            samples.append(ShardSample("uncaptioned", EncodedImage(_png(pixels), "png"), ""))
        if index == 7:
            samples.append(ShardSample("s001", EncodedImage(_png(pixels), "png"), "the same key again"))
    return samples


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sources")
    build_shapes(out, train=TRAIN * 16, val=8, size=32, samples_per_shard=16)
    write_shards(_mixed_samples(), out, prefix="mixed", samples_per_shard=100)
    return out


def _train_shards(folder: Path) -> str:
    return f"data.shards={folder}/train-{{000000..{TRAIN - 1:06d}}}.tar"  # unquoted braces, as users type them


def _mixed(sources: Path) -> list[str]:
    # Buckets (h, w): 48x80, 64x64, 80x48.
    return [f"data.shards='{sources}/mixed-000000.tar'", "data.aspect_buckets=true", "data.resolution=64",
            "data.bucket_step=16", "data.synthetic_caption_key=syn.txt"]


def run_precompute(out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> int:
    return main(["--out", str(out), "--batch-size", str(BATCH), *flags, "experiment=tiny_cpu",
                 "data.resolution=32", *overrides])


def shard_hashes(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> Path:
    """One uninterrupted single-task run over the train shards."""
    out = tmp_path_factory.mktemp("reference")
    assert run_precompute(out, _train_shards(sources)) == 0
    return out


# ------------------------------------------------------------------- content


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_cache_holds_the_encoder_outputs_in_source_order(sources, tmp_path, capsys, dtype, tolerance):
    out = tmp_path / "cache"
    assert run_precompute(out, *_mixed(sources), flags=("--dtype", dtype)) == 0
    err = capsys.readouterr().err
    assert "decode_error 1" in err and "no_caption 1" in err and "duplicate_key 1" in err, err

    cfg = compose_or_usage_error(["experiment=tiny_cpu", *_mixed(sources)])
    decoder = build_decoder(cfg.data, cfg.trainer.seed, train=False)
    usable = []
    for raw in read_shard(str(sources / "mixed-000000.tar")):
        if isinstance(raw, RawSample) and not isinstance(decoded := decoder.decode(raw, 0), Skip):
            usable.append((raw, decoded))
    cached = list(read_shard(str(out / "mixed-000000.tar")))
    assert all(isinstance(entry, RawSample) for entry in cached)
    assert [entry.key for entry in cached] == [raw.key for raw, _ in usable]  # source order, not bucket order
    assert len({decoded.bucket for _, decoded in usable}) == 3

    vae = vae_from_config(cfg.vae).eval()
    text = text_conditioner_from_config(cfg.text).eval()
    close = {"rtol": tolerance, "atol": tolerance}
    with torch.no_grad():
        for (raw, decoded), entry in zip(usable, cached):
            latent = load_safetensors(entry.fields["latent.safetensors"])
            mean, logvar = vae.encode_moments(decoded.tensors["images"][None])
            assert latent["mean"].dtype == DTYPES[dtype] and latent["mean"].shape == mean[0].shape
            torch.testing.assert_close(latent["mean"].float(), mean[0], **close)
            torch.testing.assert_close(latent["std"].float(), torch.exp(0.5 * logvar[0]), **close)
            caption = raw.fields["txt"].decode()
            synthetic = raw.fields["syn.txt"].decode() if "syn.txt" in raw.fields else None
            for extension, prompt in (("text.safetensors", caption), ("syn.safetensors", synthetic)):
                if prompt is None:
                    assert extension not in entry.fields
                    continue
                stored = load_safetensors(entry.fields[extension])
                expected = text.encode_per_encoder([prompt])
                assert sorted(stored) == sorted(TEXT_OUTPUTS)
                for name in TEXT_OUTPUTS:
                    torch.testing.assert_close(stored[name].float(), expected[name][0], **close)
            meta = json.loads(entry.fields["json"])
            expected_meta = {
                "caption": caption,
                "bucket": [decoded.bucket.height, decoded.bucket.width],
                "original_size": list(reversed(Image.open(io.BytesIO(raw.fields["png"])).size)),
                "crop_offset": decoded.tensors["crop_offsets"].tolist(),
            }
            if synthetic is not None:
                expected_meta["synthetic_caption"] = synthetic
            assert meta == expected_meta
    assert any(json.loads(entry.fields["json"])["crop_offset"] != [0, 0] for entry in cached)

    info = json.loads((out / CACHE_INFO_NAME).read_text())
    assert info["dtype"] == dtype and info["data"]["synthetic_caption_key"] == "syn.txt"
    assert info["data"]["resolution"] == 64 and info["vae"]["weights"] == cfg.vae.weights
    assert "dropout_t5" not in info["text"] and info["text"]["t5"]["d_model"] == cfg.text.t5.d_model


def test_batches_are_per_bucket_and_written_in_source_order():
    buckets = ["a", "b", "a", "a", "c", "b", "a", "a", "a", "a", "a", "a", "b"]
    batches, written = [], []

    def encode(items):
        batches.append([item.index for item in items])
        return [{"index": item.index} for item in items]

    batcher = _SourceOrderBatcher(batch_size=2, window=5, encode=encode,
                                  write=lambda record: written.append(record["index"]))
    for index, bucket in enumerate(buckets):
        batcher.add(_Item(index, str(index), None, bucket, "", None, [0, 0], [0, 0]))
    batcher.finish()
    assert written == list(range(len(buckets)))
    assert batches == [[0, 2], [1, 5], [3, 6], [7, 8], [4], [9, 10], [11], [12]]  # [4] waited too long
    assert all(len({buckets[index] for index in batch}) == 1 for batch in batches)


# ------------------------------------------------------------------- tasks


def test_two_tasks_write_the_same_shards_as_one(sources, reference, tmp_path):
    out = tmp_path / "split"
    assert run_precompute(out, _train_shards(sources), flags=("--num-tasks", "2", "--task-index", "0")) == 0
    assert sorted(shard_hashes(out)) == ["train-000000.tar", "train-000002.tar"]
    assert run_precompute(out, _train_shards(sources), flags=("--num-tasks", "2", "--task-index", "1")) == 0
    assert len(shard_hashes(reference)) == TRAIN
    assert shard_hashes(out) == shard_hashes(reference)
    assert (out / CACHE_INFO_NAME).read_bytes() == (reference / CACHE_INFO_NAME).read_bytes()


def test_task_defaults_come_from_the_slurm_array(sources, reference, tmp_path, monkeypatch):
    assert resolve_task(None, None, {}) == (0, 1)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_task(None, None, array) == (2, 3)
    assert resolve_task(None, None, {**array, "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_STEP": "2"}) == (2, 3)
    assert resolve_task(0, None, array) == (0, 3)  # a flag wins over its variable
    assert resolve_task(None, 8, array) == (2, 8)
    for index, count in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(UsageError):
            resolve_task(index, count, {})
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_COUNT"):
        resolve_task(None, None, {"SLURM_ARRAY_TASK_COUNT": "many"})

    for name, value in (("SLURM_ARRAY_TASK_ID", "11"), ("SLURM_ARRAY_TASK_MIN", "10"), ("SLURM_ARRAY_TASK_COUNT", "2")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "slurm"
    assert run_precompute(out, _train_shards(sources)) == 0
    assert shard_hashes(out) == {name: digest for name, digest in shard_hashes(reference).items()
                                 if name in ("train-000001.tar", "train-000003.tar")}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")  # outside the array of 2
    assert run_precompute(out, _train_shards(sources)) == 2


# -------------------------------------------------------------- kill, rerun


def test_killed_run_rerun_gives_the_uninterrupted_shards(sources, reference, tmp_path):
    """SIGKILL while the second shard is half written; the rerun finishes with identical shards.

    The second source shard is a FIFO this test feeds, so the kill lands at a known point: the
    first cache shard is complete and the second one's temporary file holds some records.
    """
    source = tmp_path / "source"
    source.mkdir()
    for index in range(TRAIN):
        name = f"train-{index:06d}.tar"
        if index == 1:
            os.mkfifo(source / name)
        else:
            shutil.copy(sources / name, source / name)
    out = tmp_path / "cache"
    log = tmp_path / "precompute.log"
    command = [sys.executable, "-m", "sd3train.curation.precompute", "--out", str(out), "--batch-size", str(BATCH),
               "experiment=tiny_cpu", "data.resolution=32", _train_shards(source)]
    second = (sources / "train-000001.tar").read_bytes()

    def partial() -> list[Path]:
        return [path for path in out.glob(f".train-000001.tar{TEMP_MARK}*") if path.stat().st_size > 0]

    sigkill_while_feeding_fifo(
        command, log, source / "train-000001.tar",
        second[: len(second) * 3 // 4],  # about 12 of its 16 samples: 2 batches written
        ready=lambda: (out / "train-000000.tar").exists(), ready_what="the first cache shard",
        fed=lambda: bool(partial()), fed_what="a partly written second shard",
    )
    assert sorted(path.name for path in out.glob("*.tar")) == ["train-000000.tar"]  # nothing partial under a final name
    assert partial()  # the killed shard is only under its temporary name

    (source / "train-000001.tar").unlink()
    shutil.copy(sources / "train-000001.tar", source / "train-000001.tar")
    assert run_precompute(out, _train_shards(source)) == 0
    assert shard_hashes(out) == shard_hashes(reference)
    assert not list(out.glob(f".*{TEMP_MARK}*"))


# ---------------------------------------------------------------- refusals


def test_other_settings_than_the_cache_folder_exit_2_naming_them(sources, tmp_path, capsys):
    out = tmp_path / "cache"
    nothing = ("--num-tasks", str(TRAIN + 1), "--task-index", str(TRAIN))  # no shard: only cache_info.json
    assert run_precompute(out, _train_shards(sources), flags=nothing) == 0
    assert (out / CACHE_INFO_NAME).is_file()
    assert run_precompute(out, _train_shards(sources), "text.dropout_t5=0.1", flags=nothing) == 0  # training-only
    capsys.readouterr()
    code = run_precompute(out, _train_shards(sources), "vae.scaling_factor=0.5", "data.min_size=8",
                          flags=("--dtype", "fp16"))
    err = capsys.readouterr().err
    assert code == 2
    assert "vae.scaling_factor: cache has 0.605499, this run has 0.5" in err, err
    assert "data.min_size" in err and 'dtype: cache has "bf16", this run has "fp16"' in err
    assert "text." not in err and not list(out.glob("*.tar"))


@pytest.mark.parametrize("overrides, message", [
    (["data.resolution=33"], "data.resolution=33 is not a multiple"),
    (["data.cached=true"], "data.cached=true"),
    (["+data.sources=[{shards: a.tar}]"], "data.sources is not supported"),
    (["data.shards='/a/x.tar::/b/x.tar'"], "the same cache shard x.tar"),
    (["data.shards=OUT/x.tar"], "is where the source shards are"),
])
def test_bad_config_exits_2_before_building_anything(tmp_path, capsys, monkeypatch, overrides, message):
    overrides = [override.replace("OUT", str(tmp_path / "cache")) for override in overrides]
    monkeypatch.setattr(precompute, "Encoders", None)  # building a model would raise
    assert main(["--out", str(tmp_path / "cache"), "experiment=tiny_cpu", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache" / CACHE_INFO_NAME).exists()


def test_unreadable_source_shard_exits_1_and_writes_nothing_for_it(sources, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    # Unquoted, as the shell leaves `data.shards={a,b}` (braces expanded into one word each).
    spec = (f"data.shards={sources}/train-000000.tar", f"data.shards={tmp_path}/missing-000000.tar")
    assert run_precompute(out, *spec) == 1
    assert "FAILED" in capsys.readouterr().err
    assert shard_hashes(out) == {"train-000000.tar": shard_hashes(reference)["train-000000.tar"]}
    assert not list(out.glob(".*"))


def test_output_names():
    assert output_name("/data/src/00001.tar") == "00001.tar"
    assert output_name("file:///data/src/00001.tar.gz") == "00001.tar"
    assert output_name("https://host/data/00001.tar?download=1") == "00001.tar"
    assert output_name("pipe:aws s3 cp s3://bucket/train/00001.tar -") == "00001.tar"
    with pytest.raises(UsageError, match="does not end in .tar"):
        output_name("pipe:cat /data/shard")


# ------------------------------------------------------------ training checks


def test_training_on_a_cache_made_with_other_settings_fails_at_config_time(reference, tmp_path):
    from sd3train.config.typed import ConfigError
    from tests.support.config import compose_config

    def training_config(*overrides: str):
        return compose_config("experiment=tiny_cpu", "data=cached",
                              f"data.shards='{reference}/train-{{000000..{TRAIN - 1:06d}}}.tar'", "data.resolution=32",
                              *overrides)

    assert training_config().data.cached  # the settings it was made with: accepted
    assert training_config("text.dropout_t5=0.1").text.dropout_t5 == 0.1  # training-time only
    with pytest.raises(ConfigError, match=r"vae.scaling_factor: cache has .*, this run has 0.5"):
        training_config("vae.scaling_factor=0.5")
    not_a_cache = tmp_path / "plain"
    build_shapes(not_a_cache, train=16, val=1, size=32, samples_per_shard=16)
    with pytest.raises(ConfigError, match="has no readable cache_info.json"):
        training_config(f"data.shards='{not_a_cache}/train-000000.tar'")


def test_a_truncated_source_fails_unless_kept_on_purpose(sources, tmp_path, capsys):
    cut = tmp_path / "cut-000000.tar"
    data = (sources / "train-000001.tar").read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a reset download: half a shard
    assert run_precompute(tmp_path / "strict", f"data.shards='{cut}'") == 1
    assert not (tmp_path / "strict" / "cut-000000.tar").exists()  # a rerun will retry it
    assert run_precompute(tmp_path / "kept", f"data.shards='{cut}'", flags=("--keep-truncated",)) == 0
    kept = [event for event in read_shard(str(tmp_path / "kept" / "cut-000000.tar")) if isinstance(event, RawSample)]
    assert 0 < len(kept) < 16
