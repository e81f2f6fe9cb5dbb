"""Bitwise-exact resume under ZeRO-2, ZeRO-3, FSDP2 and of a LoRA run (DDP) on two CPU processes: N steps straight vs k steps,
SIGKILL, resume to N. Per-step losses and final weights (MM-DiT and EMA) are identical; a resume that
draws from other random streams (the negative control) is not."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sd3train.checkpoint.files import read_lightning_checkpoint
from tests.support.checkpoints import write_training_checkpoint
from tests.support.processes import BIN, finish, launch

STEPS, KILL_AFTER = 6, 4
FAST = ["experiment=tiny_cpu", "trainer.devices=2", "model.depth=1", "data.batch_size=4", f"trainer.max_steps={STEPS}",
        "data.num_workers=2", "data.cache_latents=false", "eval.prompts=[]", "eval.samples_per_caption=0",
        "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "data.val_shards=null",
        "trainer.checkpoint_every_n_steps=2", "optim.lr=5e-3",
        "ema.every_n_steps=2"]  # EMA updates at steps 2, 4 and 6: before and after the resume at 4


def start(shapes: Path, cwd: Path, strategy: str, *extra: str) -> subprocess.Popen:
    return launch([str(BIN / "sd3train-train"), *FAST, f"strategy={strategy}",
                   f"data.shards='{shapes}/train-{{000000..000003}}.tar'", *extra], cwd)


def run_dir(cwd: Path) -> Path:
    return cwd / "runs" / "tiny_cpu" / "main"


def losses(cwd: Path) -> dict[int, str]:
    """step -> train/loss as written (repr of the float: exact)."""
    with open(run_dir(cwd) / "metrics.csv", newline="") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")}


def final_weights(cwd: Path) -> dict[str, torch.Tensor]:
    state = read_lightning_checkpoint(run_dir(cwd) / "checkpoints" / "last")["state_dict"]
    return {key: value for key, value in state.items() if key.startswith(("mmdit.", "ema.shadow."))}


def kill_after_checkpoint(process: subprocess.Popen, cwd: Path, step: int) -> None:
    marker = run_dir(cwd) / "checkpoints" / f"step-{step:07d}" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def lora_on_a_base(tmp_path: Path) -> list[str]:
    """Overrides for a LoRA run on a depth-2 base checkpoint written into `tmp_path`."""
    (tmp_path / "base").mkdir()
    base = write_training_checkpoint(tmp_path / "base")
    return ["model.depth=2", f"model.weights={base}", "adapter=lora", "adapter.rank=4", "adapter.targets=[attention,mlp]"]


@pytest.mark.parametrize("strategy", ["zero2", pytest.param("zero3", marks=pytest.mark.slow), "fsdp",
                                      pytest.param("lora", marks=pytest.mark.slow)])  # each about 50 s
def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_one(small_shapes, tmp_path, strategy):
    straight, resumed, control = tmp_path / "straight", tmp_path / "resumed", tmp_path / "control"
    for folder in (straight, resumed):
        folder.mkdir()
    extra = lora_on_a_base(tmp_path) if strategy == "lora" else []
    strategy = "ddp" if strategy == "lora" else strategy  # LoRA: two DDP ranks, only the adapter trains
    finish(start(small_shapes, straight, strategy, *extra))
    kill_after_checkpoint(start(small_shapes, resumed, strategy, *extra), resumed, KILL_AFTER)
    shutil.copytree(resumed, control, symlinks=True)
    # The killed run may have gone past step 4; resume=auto takes the newest complete checkpoint.
    for folder in (resumed, control):
        for path in sorted((run_dir(folder) / "checkpoints").glob("step-*")):
            if int(path.name.split("-")[1]) > KILL_AFTER:
                shutil.rmtree(path)
        (run_dir(folder) / "checkpoints" / "last").unlink(missing_ok=True)
        (run_dir(folder) / "checkpoints" / "last").symlink_to(f"step-{KILL_AFTER:07d}")
    output = finish(start(small_shapes, resumed, strategy, *extra))
    assert f"step-{KILL_AFTER:07d}" in output  # it resumed, from the checkpoint before the kill
    finish(start(small_shapes, control, strategy, *extra, "trainer.callbacks=[tests.support.faults.ReseedOnResume]"))

    reference = losses(straight)
    assert sorted(reference) == list(range(STEPS))
    after_resume = {step: loss for step, loss in losses(resumed).items() if step >= KILL_AFTER}
    assert after_resume == {step: reference[step] for step in range(KILL_AFTER, STEPS)}
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    # Negative control: the same resume drawing other noise differs, so the test can fail.
    control_losses = {step: loss for step, loss in losses(control).items() if step >= KILL_AFTER}
    assert control_losses != after_resume
    assert not all(torch.equal(expected[key], value) for key, value in final_weights(control).items())
