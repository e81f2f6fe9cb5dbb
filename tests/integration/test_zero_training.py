"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo), launched as a user launches them:

    sd3train-train experiment=tiny_cpu strategy=zero2 trainer.devices=2
    sd3train-train experiment=tiny_cpu strategy=zero3 trainer.devices=2

Lightning starts the second rank itself by re-running the console script. Each run trains the
smallest model 4 steps on 4 shards (2 per rank) and validates once; about 30 s on 2 cores, most
of it two processes importing torch, Lightning and DeepSpeed.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.step_dirs import latest_complete_checkpoint
from tests.support.processes import BIN, assert_export_holds_the_ema, finish, launch

STEPS = 4
FAST = ["experiment=tiny_cpu", "trainer.devices=2", "model.depth=1", "data.batch_size=4", f"trainer.max_steps={STEPS}",
        "data.num_workers=0", "data.cache_latents=false", "eval.prompts=[]", "eval.samples_per_caption=0",
        "eval.sample_every_n_steps=0", "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        f"trainer.val_every_n_steps={STEPS}", "data.val_batches=1", f"trainer.checkpoint_every_n_steps={STEPS}",
        "ema.every_n_steps=1"]  # the EMA moves every step, so the ZeRO-3 and ZeRO-2 averages have something to match


def train(shapes: Path, cwd: Path, strategy: str, *extra: str) -> tuple[Path, float, str]:
    """Run sd3train-train with `strategy` on 2 processes; (run directory, seconds, output)."""
    args = [str(BIN / "sd3train-train"), *FAST, f"strategy={strategy}", *extra,
            f"data.shards='{shapes}/train-{{000000..000003}}.tar'", f"data.val_shards='{shapes}/val-000000.tar'"]
    start = time.monotonic()
    output = finish(launch(args, cwd))
    seconds = time.monotonic() - start
    print(f"\n{strategy}: 2-process run took {seconds:.1f} s")
    return cwd / "runs" / "tiny_cpu" / "main", seconds, output


@pytest.fixture(scope="module")
def zero2_run(small_shapes, tmp_path_factory):
    return train(small_shapes, tmp_path_factory.mktemp("zero2"), "zero2")


@pytest.fixture(scope="module")
def zero3_run(small_shapes, tmp_path_factory):
    # With a preview and the colour evaluation: under ZeRO-3 every rank must take part in sampling.
    return train(small_shapes, tmp_path_factory.mktemp("zero3"), "zero3", "eval.prompts=[a red circle on a white background]",
                 "eval.samples_per_caption=1", "diffusion.sampler.num_steps=2")


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def deepspeed_files(run_dir: Path) -> dict[str, int]:
    """Name -> size of the files in the newest complete checkpoint's DeepSpeed tag directory."""
    checkpoint = latest_complete_checkpoint(run_dir / "checkpoints")
    assert checkpoint == run_dir / "checkpoints" / f"step-{STEPS:07d}" / "checkpoint.ckpt"
    assert checkpoint.is_dir()  # DeepSpeed writes a directory of per-rank shards
    tag = (checkpoint / "latest").read_text().strip()
    return {path.name: path.stat().st_size for path in (checkpoint / tag).iterdir()}


def load_shard(run_dir: Path, name: str) -> dict:
    checkpoint = latest_complete_checkpoint(run_dir / "checkpoints")
    tag = (checkpoint / "latest").read_text().strip()
    return torch.load(checkpoint / tag / name, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("run", ["zero2_run", "zero3_run"])
def test_two_processes_train_every_step_with_finite_losses(run, request):
    run_dir, _, output = request.getfixturevalue(run)
    losses = train_losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    with open(run_dir / "metrics.csv", newline="") as handle:
        assert [row["val/loss"] for row in csv.DictReader(handle) if row.get("val/loss")]  # validation ran
    # No JIT build (the shm comm op, FusedAdam, CPUAdam): it would print the extensions root.
    assert "torch_extensions" not in output and "ninja" not in output.lower()


def test_zero2_checkpoint_holds_the_whole_model_once_and_the_optimizer_in_two_shards(zero2_run):
    run_dir, _, _ = zero2_run
    files = deepspeed_files(run_dir)
    assert set(files) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def test_zero3_ranks_each_hold_half_of_the_mmdit(zero3_run):
    run_dir, _, _ = zero3_run
    files = deepspeed_files(run_dir)
    ranks = (0, 1)
    assert set(files) == {f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in ranks for kind in ("model", "optim")}
    trainable = None
    for rank in ranks:
        model_states = load_shard(run_dir, f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        module = {key.removeprefix("_forward_module."): value for key, value in model_states["module"].items()}
        # At save time every MM-DiT parameter is partitioned: the module holds empty placeholders.
        mmdit_shapes = model_states["param_shapes"][0]
        assert all(name.removeprefix("_forward_module.").startswith("mmdit.") for name in mmdit_shapes)
        assert all(module[name.removeprefix("_forward_module.")].numel() == 0 for name in mmdit_shapes)
        trainable = sum(shape.numel() for shape in mmdit_shapes.values())
        # This rank's fp32 weights (and Adam moments) are its half of the MM-DiT.
        optim = load_shard(run_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        assert optim["zero_stage"] == 3 and optim["partition_count"] == 2
        assert sum(group.numel() for group in optim["fp32_flat_groups"]) == math.ceil(trainable / 2)
    assert trainable > 100_000


def test_zero3_trains_the_same_model_as_zero2(zero2_run, zero3_run):
    assert train_losses(zero3_run[0]) == pytest.approx(train_losses(zero2_run[0]), rel=1e-5)
    zero2 = read_lightning_checkpoint(zero2_run[0] / "checkpoints" / "last")["state_dict"]
    zero3 = read_lightning_checkpoint(zero3_run[0] / "checkpoints" / "last")["state_dict"]
    mmdit = [key for key in zero2 if key.startswith("mmdit.")]
    assert mmdit and set(mmdit) <= set(zero3)
    for key in mmdit:
        torch.testing.assert_close(zero3[key], zero2[key], rtol=0, atol=1e-6)


def test_zero3_ema_matches_zero2(zero2_run, zero3_run):
    zero2 = read_lightning_checkpoint(zero2_run[0] / "checkpoints" / "last")["state_dict"]
    zero3 = read_lightning_checkpoint(zero3_run[0] / "checkpoints" / "last")["state_dict"]
    shadow = [key for key in zero2 if key.startswith("ema.shadow.") and zero2[key].is_floating_point()]
    assert shadow
    for key in shadow:
        torch.testing.assert_close(zero3[key], zero2[key], rtol=0, atol=1e-6)


def test_zero3_previews_and_evaluates_with_every_rank_sampling(zero3_run):
    run_dir, _, output = zero3_run
    assert (run_dir / "samples" / f"step-{STEPS}" / "samples.jsonl").is_file()
    assert "eval/colour_adherence = " in output


def test_resuming_a_two_rank_zero_checkpoint_on_one_rank_fails_with_the_way_out(zero2_run, small_shapes):
    run_dir, _, _ = zero2_run
    cwd = run_dir.parents[2]
    args = [str(BIN / "sd3train-train"), *FAST, "strategy=zero2", "trainer.devices=1", f"trainer.max_steps={STEPS + 2}",
            f"data.shards='{small_shapes}/train-{{000000..000003}}.tar'", f"data.val_shards='{small_shapes}/val-000000.tar'"]
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was written by 2 ranks (ZeRO stage 2), this run has 1" in result.stderr
    assert "sd3train-export checkpoint=" in result.stderr and "format=single_file" in result.stderr


def test_sd3train_export_consolidates_a_zero_checkpoint_directory(zero3_run, tmp_path):
    assert_export_holds_the_ema(zero3_run[0], tmp_path / "weights.safetensors")
