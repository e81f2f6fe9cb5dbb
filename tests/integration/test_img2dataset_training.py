"""`sd3train-train data.shards=/path/to/img2dataset/output/{00000..00009}.tar` on img2dataset output as it is.

img2dataset writes `00000.tar, 00001.tar, ...` (5 digits, no prefix) holding `<9-digit key>.jpg`,
`.txt` and `.json` members, and next to each shard `00000_stats.json` and `00000.parquet`, which
training must leave alone. The console script is run as a user runs it: the brace spec as one
word (quoted in the shell) and as the words bash brace expansion makes of it (unquoted).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd3train.config.overrides import normalise_overrides
from sd3train.data.skips import REASONS
from sd3train.data.tar_writer import EncodedImage, write_shards
from tests.support.config import tiny_config
from tests.support.photo_shards import jpeg_bytes, photo_samples

BIN = Path(sys.executable).parent
SAMPLES_PER_SHARD = 10
# Square, landscape, portrait and a wide one: several aspect buckets at resolution 64.
SIZES = ((64, 64), (96, 64), (64, 96), (128, 64), (80, 72))
# A few steps of the smallest model; nothing but the 3 training steps and the final checkpoint.
FAST = [
    "experiment=tiny_cpu", "data.val_shards=null", "data.aspect_buckets=true", "data.resolution=64",
    "trainer.max_steps=3", "model.depth=1", "data.batch_size=4", "data.num_workers=0",
    "eval.samples_per_caption=0", "eval.prompts=[]", "eval.sample_every_n_steps=0", "logger.wandb=false",
    "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3", "trainer.progress_bar=false",
]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
    tf.addfile(info, io.BytesIO(data))


def write_img2dataset_output(folder: Path, num_shards: int = 2) -> list[str]:
    """An img2dataset output folder (webdataset format, jpg); returns every sample key."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(num_shards):
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
            for index in range(SAMPLES_PER_SHARD):
                key = f"{shard:05d}{index:04d}"  # img2dataset: shard id then index in the shard
                width, height = SIZES[(shard * SAMPLES_PER_SHARD + index) % len(SIZES)]
                image = jpeg_bytes(width, height, seed=shard * 100 + index)
                caption = f"a photo number {index} of shard {shard}"
                meta = {
                    "url": f"https://example.com/images/{key}.jpg", "key": key, "caption": caption,
                    "status": "success", "error_message": None, "width": width, "height": height,
                    "original_width": width * 3, "original_height": height * 3, "exif": None,
                    "sha256": hashlib.sha256(image).hexdigest(),
                }
                _add(tf, f"{key}.jpg", image)
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
                rows.append(meta)
                keys.append(key)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": SAMPLES_PER_SHARD, "successes": SAMPLES_PER_SHARD, "failed_to_download": 0,
            "failed_to_resize": 0, "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
            "status_dict": {"success": SAMPLES_PER_SHARD},
        }))
    return keys


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("img2dataset") / "output"
    write_img2dataset_output(folder)
    return folder


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def assert_trained_three_steps(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    steps = sorted({int(row["step"]) for row in rows if row.get("train/loss")})
    assert steps == [0, 1, 2], steps  # Lightning logs step k-1 for the k-th optimizer step
    # Both shards were read (a lone `data.shards=` word of bash's expansion would mean only the last
    # one: 10), every member was understood, and the parquet/stats sidecars were not read as shards.
    last = rows[-1]
    assert float(last["data/samples_read"]) == 2 * SAMPLES_PER_SHARD, last["data/samples_read"]
    assert {name: float(value) for name, value in last.items() if name.startswith("data/skipped_")} == {
        f"data/skipped_{reason}": 0.0 for reason in REASONS} | {"data/skipped_fraction": 0.0}
    assert (run_dir / "checkpoints" / "last" / "checkpoint.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step-0000003" / "COMPLETE").is_file()


def run_train(shard_args: list[str], runs_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    args = [str(BIN / "sd3train-train"), *FAST, *shard_args, f"paths.runs_dir={runs_dir}"]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def test_console_script_trains_on_img2dataset_shards_given_as_one_brace_spec(img2dataset_output, tmp_path):
    # What the shell passes for data.shards='/out/{00000..00001}.tar' (or a shell without brace expansion).
    start = time.perf_counter()
    result = run_train([f"data.shards={img2dataset_output}/{{00000..00001}}.tar"], tmp_path / "runs", tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_trained_three_steps(tmp_path / "runs" / "tiny_cpu" / "main")
    print(f"one brace spec: {elapsed:.1f} s")


def test_console_script_trains_on_img2dataset_shards_after_bash_brace_expansion(img2dataset_output, tmp_path):
    # What bash passes for an unquoted data.shards=/out/{00000..00001}.tar: one word per shard.
    words = [f"data.shards={img2dataset_output}/{shard:05d}.tar" for shard in range(2)]
    result = run_train(words, tmp_path / "runs", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_trained_three_steps(tmp_path / "runs" / "tiny_cpu" / "main")


def test_both_spellings_name_the_same_two_shards(img2dataset_output):
    from sd3train.data.sources import resolve_shard_urls

    quoted = normalise_overrides([f"data.shards={img2dataset_output}/{{00000..00001}}.tar", "model.depth=1"])
    expanded = normalise_overrides([f"data.shards={img2dataset_output}/{i:05d}.tar" for i in range(2)] + ["model.depth=1"])
    assert quoted[1:] == expanded[1:] == ["model.depth=1"]
    specs = [arg.split("=", 1)[1].strip("'\"") for arg in (quoted[0], expanded[0])]
    expected = [str(img2dataset_output / "00000.tar"), str(img2dataset_output / "00001.tar")]
    assert [resolve_shard_urls(spec) for spec in specs] == [expected, expected]


# ---------------------------------------------------------------- bad samples, in-process fit


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            _add(tf, name, data)


def write_bad_set(folder: Path) -> tuple[str, int]:
    """Good shards plus one of each problem: truncated shard, corrupt JPEG, no caption, duplicate key.

    Returns (shard spec, number of good samples). All images are 64x64: one square bucket.
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = [s._replace(image=EncodedImage(jpeg_bytes(64, 64, seed=i), "jpg"))
            for i, s in enumerate(photo_samples(16, seed=1, synthetic=False))]
    write_shards(good, folder, prefix="good", samples_per_shard=8)
    # A truncated shard: 6 samples, cut inside the image of the 4th: 3 samples survive.
    cut = [s._replace(key=f"cut{i}", image=EncodedImage(jpeg_bytes(64, 64, seed=50 + i), "jpg"))
           for i, s in enumerate(photo_samples(6, seed=2, synthetic=False))]
    write_shards(cut, folder, prefix="cut", samples_per_shard=6)
    path = folder / "cut-000000.tar"
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name == "cut3.jpg")
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    corrupt = jpeg_bytes(64, 64, seed=77)
    members = []
    for i in range(3):
        members += [(f"mix{i}.jpg", jpeg_bytes(64, 64, seed=80 + i)), (f"mix{i}.txt", f"mixed {i}".encode())]
    members += [("bad.jpg", corrupt[: len(corrupt) // 2]), ("bad.txt", b"corrupt")]
    members += [("nocap.jpg", jpeg_bytes(64, 64, seed=90)), ("nocap.json", b"{}")]
    members += [("mix0.jpg", jpeg_bytes(64, 64, seed=91)), ("mix0.txt", b"a duplicate")]
    _tar(folder / "mixed-000000.tar", members)
    return f"{folder}/good-{{000000..000001}}.tar::{folder}/cut-000000.tar::{folder}/mixed-000000.tar", 16 + 3 + 3


def test_in_process_fit_on_bad_samples_trains_to_completion_and_logs_per_reason_counts(tmp_path):
    from sd3train.train import fit, run_dir_of

    spec, good = write_bad_set(tmp_path / "shards")
    assert good == 22
    # 22 good samples in one bucket, batches of 4: an epoch is 5 full batches and one of 2, so
    # 6 steps are exactly epoch 0 and the counts at the end are epoch 0's.
    cfg = tiny_config(
        tmp_path / "unused", tmp_path / "runs",
        f"data.shards='{spec}'", "data.val_shards=null", "data.batch_size=4", "data.shuffle_buffer=8",
        "data.skip_budget=0.25", "data.skip_budget_min_samples=16",
        "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=6",
        "trainer.progress_bar=false", "model.depth=1", "eval.samples_per_caption=0", "eval.prompts=[]",
        "eval.sample_every_n_steps=0", "logger.wandb=false",
    )
    assert cfg.data.shards == spec
    start = time.perf_counter()
    fit(cfg)
    elapsed = time.perf_counter() - start
    run_dir = run_dir_of(cfg)
    rows = [row for row in read_metrics(run_dir) if row.get("data/skipped_decode_error")]
    last = rows[-1]
    assert int(last["step"]) == 5
    counts = {reason: float(last[f"data/skipped_{reason}"]) for reason in (
        "truncated_shard", "decode_error", "no_caption", "duplicate_key", "blocklisted", "no_image",
        "too_small", "unreadable_shard")}
    assert counts == {"truncated_shard": 1.0, "decode_error": 1.0, "no_caption": 1.0, "duplicate_key": 1.0,
                      "blocklisted": 0.0, "no_image": 0.0, "too_small": 0.0, "unreadable_shard": 0.0}
    assert float(last["data/samples_read"]) == 26.0  # 22 good samples + 4 problems
    assert (run_dir / "checkpoints" / "last" / "COMPLETE").is_file()
    print(f"in-process fit, 6 steps: {elapsed:.1f} s")
