"""FSDP2 (`strategy=fsdp`) on CPU processes (gloo), launched as a user launches it:

    sd3train-train experiment=tiny_cpu strategy=fsdp trainer.devices=2

Two ranks train the smallest model 4 steps as DDP does (same losses and weights), each holding half
of the MM-DiT; every rank samples the previews; the DCP checkpoint is read back by export and
sampling and resumes on 1 and on 3 ranks with the weights it saved; float8 (emulated) trains within
a stated tolerance of bf16.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.step_dirs import latest_complete_checkpoint
from tests.support.probes import LOADED_WEIGHTS
from tests.support.processes import BIN, assert_export_holds_the_ema, finish, launch

STEPS = 4
FAST = ["experiment=tiny_cpu", "model.depth=1", "data.batch_size=4", "data.num_workers=0", "data.cache_latents=false",
        "eval.prompts=[]", "eval.samples_per_caption=0", "eval.sample_every_n_steps=0", "logger.wandb=false",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1", f"trainer.val_every_n_steps={STEPS}",
        "data.val_batches=1", f"trainer.checkpoint_every_n_steps={STEPS}", "ema.every_n_steps=1"]


def train(shapes: Path, cwd: Path, strategy: str, devices: int, *extra: str) -> tuple[Path, str]:
    cwd.mkdir(parents=True, exist_ok=True)
    args = [str(BIN / "sd3train-train"), *FAST, f"strategy={strategy}", f"trainer.devices={devices}",
            f"trainer.max_steps={STEPS}", *extra,
            f"data.shards='{shapes}/train-{{000000..000003}}.tar'", f"data.val_shards='{shapes}/val-000000.tar'"]
    return cwd / "runs" / "tiny_cpu" / "main", finish(launch(args, cwd))


@pytest.fixture(scope="module")
def fsdp_run(small_shapes, tmp_path_factory):
    # With a preview and the colour evaluation: under FSDP2 every rank must take part in sampling.
    return train(small_shapes, tmp_path_factory.mktemp("fsdp"), "fsdp", 2, "diffusion.sampler.num_steps=2",
                 "eval.prompts=[a red circle on a white background]", "eval.samples_per_caption=1")


@pytest.fixture(scope="module")
def ddp_run(small_shapes, tmp_path_factory):
    return train(small_shapes, tmp_path_factory.mktemp("ddp"), "ddp", 2)


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def trained(state: dict) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.startswith(("mmdit.", "ema.shadow."))}


def test_two_fsdp_ranks_train_as_two_ddp_ranks(fsdp_run, ddp_run):
    fsdp_losses, ddp_losses = train_losses(fsdp_run[0]), train_losses(ddp_run[0])
    assert sorted(fsdp_losses) == list(range(STEPS)) and all(math.isfinite(loss) for loss in fsdp_losses.values())
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-6)
    fsdp = trained(read_lightning_checkpoint(fsdp_run[0] / "checkpoints" / "last")["state_dict"])
    ddp = trained(read_lightning_checkpoint(ddp_run[0] / "checkpoints" / "last")["state_dict"])
    assert fsdp.keys() == ddp.keys() and any(key.startswith("ema.shadow.") for key in fsdp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6)


def test_each_rank_writes_half_of_the_mmdit(fsdp_run):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    checkpoint = latest_complete_checkpoint(fsdp_run[0] / "checkpoints")
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    per_file: Counter = Counter()
    total = 0
    for key, tensor in metadata.state_dict_metadata.items():
        if not key.startswith("state_dict.mmdit."):
            continue
        total += math.prod(tensor.size)
        for chunk in tensor.chunks:
            file = metadata.storage_data[MetadataIndex(key, chunk.offsets)].relative_path
            per_file[file] += math.prod(chunk.sizes)
    assert total > 100_000 and sum(per_file.values()) == total  # every element written once
    assert len(per_file) == 2
    # Shards split the first dimension: a tensor whose first dimension is 1 (the position-embedding
    # table, 6% here) stays whole on rank 0.
    for count in per_file.values():
        assert abs(count - total / 2) < 0.1 * total, (per_file, total)


def test_every_rank_samples_the_previews_and_evaluation(fsdp_run):
    run_dir, output = fsdp_run
    assert (run_dir / "samples" / f"step-{STEPS}" / "samples.jsonl").is_file()
    assert "eval/colour_adherence = " in output


def test_sd3train_export_reads_an_fsdp_checkpoint(fsdp_run, tmp_path):
    assert_export_holds_the_ema(fsdp_run[0], tmp_path / "weights.safetensors")


def test_sd3train_sample_reads_an_fsdp_checkpoint(fsdp_run, tmp_path):
    run_dir, _ = fsdp_run
    result = subprocess.run([str(BIN / "sd3train-sample"), f"checkpoint={run_dir / 'checkpoints' / 'last'}",
                             "prompts=[a red circle on a white background]", "num_steps=2", f"out={tmp_path}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "samples.jsonl").is_file() and len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("devices", [1, pytest.param(3, marks=pytest.mark.slow)])  # 3 ranks: 25 s more
def test_a_two_rank_checkpoint_resumes_on_another_number_of_ranks(fsdp_run, small_shapes, tmp_path, devices):
    source, _ = fsdp_run
    cwd = tmp_path / "moved"
    run_dir = cwd / "runs" / "tiny_cpu" / "main"
    shutil.copytree(source, run_dir, symlinks=True)
    saved = trained(read_lightning_checkpoint(run_dir / "checkpoints" / "last")["state_dict"])
    _, output = train(small_shapes, cwd, "fsdp", devices, f"trainer.max_steps={STEPS + 2}",
                      "data.resume_resplit=true", "trainer.callbacks=[tests.support.probes.SaveWeightsAtStart]")
    assert f"step-{STEPS:07d}" in output  # resumed from the 2-rank checkpoint
    loaded = torch.load(run_dir / LOADED_WEIGHTS)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)  # resharded exactly
    losses = train_losses(run_dir)
    assert {STEPS, STEPS + 1} <= set(losses) and all(math.isfinite(losses[step]) for step in (STEPS, STEPS + 1))
    assert latest_complete_checkpoint(run_dir / "checkpoints").parent.name == f"step-{STEPS + 2:07d}"


def test_an_fsdp_checkpoint_is_not_resumed_under_ddp(fsdp_run, small_shapes, tmp_path):
    cwd = tmp_path / "moved"
    shutil.copytree(fsdp_run[0], cwd / "runs" / "tiny_cpu" / "main", symlinks=True)
    args = [str(BIN / "sd3train-train"), *FAST, "strategy=ddp", f"trainer.max_steps={STEPS + 2}",
            f"data.shards='{small_shapes}/train-{{000000..000003}}.tar'", "data.val_shards=null"]
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was written under strategy fsdp, this run uses strategy.name=ddp" in result.stderr


def assert_close_losses(got: dict[int, float], reference: dict[int, float], steps: int) -> None:
    """Float8 against bf16: every step's loss within 5%, the last 10 steps' mean within 1%, and
    not the same numbers (the float8 casts ran)."""
    assert sorted(got) == sorted(reference) == list(range(steps))
    assert all(abs(got[step] - reference[step]) <= 0.05 * reference[step] for step in reference), (got, reference)
    tail = range(steps - 10, steps)
    assert abs(sum(got[s] for s in tail) - sum(reference[s] for s in tail)) <= 0.01 * sum(reference[s] for s in tail)
    assert got != reference


BF16_50 = ["trainer.precision=bf16-mixed", "model.attention_backend=math", "trainer.max_steps=50",
           "trainer.checkpoint_every_n_steps=50", "trainer.val_every_n_steps=50"]


def test_float8_trains_the_tiny_model_50_steps_within_tolerance_of_bf16(small_shapes, tmp_path):
    # One rank, eager: the float8 path through sd3train-train (emulated on this CPU).
    float8, _ = train(small_shapes, tmp_path / "float8", "fsdp", 1, *BF16_50, "model.float8=tensorwise")
    bf16, _ = train(small_shapes, tmp_path / "bf16", "fsdp", 1, *BF16_50)
    assert_close_losses(train_losses(float8), train_losses(bf16), 50)


@pytest.mark.slow  # about 90 s: two 2-process runs, one compiling its blocks with inductor
def test_compiled_float8_blocks_under_fsdp_train_within_tolerance_of_bf16(small_shapes, tmp_path):
    float8, output = train(small_shapes, tmp_path / "float8", "fsdp", 2, *BF16_50, "model.compile=true",
                           "model.float8=rowwise")
    bf16, _ = train(small_shapes, tmp_path / "bf16", "fsdp", 2, *BF16_50)
    assert "graph break" not in output.lower()
    assert_close_losses(train_losses(float8), train_losses(bf16), 50)
