"""The acceptance test of atomic checkpoints: SIGKILL `sd3train-train` while it writes a checkpoint,
and the previous checkpoint is the one resume picks; the rerun continues from it."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.step_dirs import complete_checkpoints, latest_complete_checkpoint

BIN = Path(sys.executable).parent
# The tiny model on the repo's shapes, no latent cache or validation: a few seconds per process.
FAST = ["experiment=tiny_cpu", "model.depth=1", "data.batch_size=4", "data.num_workers=0", "data.cache_latents=false",
        "data.val_shards=null", "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2",
        "trainer.max_steps=6"]
ENV = {**os.environ, "WANDB_MODE": "offline"}


def train_steps_logged(run_dir: Path) -> list[int]:
    """Optimizer steps of the metrics.csv rows holding a training loss, in file order (Lightning
    logs step k-1 for the k-th optimizer step)."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["step"]) + 1 for row in csv.DictReader(handle) if row.get("train/loss")]


# PauseBeforePublish holds every checkpoint but a process's first between checkpoint.ckpt and its
# marker; PauseMidDCPSave holds FSDP2's inside torch.distributed.checkpoint.save, between the ranks'
# shards and the index. Step 2 is published at once, step 4 waits there for the kill.
CASES = {"ddp": ([], "PauseBeforePublish"), "fsdp": (["strategy=fsdp", "trainer.devices=2"], "PauseMidDCPSave")}


@pytest.mark.parametrize("strategy", list(CASES))
def test_sigkill_while_checkpointing_leaves_the_previous_checkpoint_and_the_rerun_resumes(repo_shapes, tmp_path, strategy):
    run_dir = tmp_path / "runs" / "tiny_cpu" / "main"
    checkpoints = run_dir / "checkpoints"
    staged = checkpoints / ".staging-step-0000004" / "checkpoint.ckpt"
    extra, fault = CASES[strategy]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([str(BIN / "sd3train-train"), *FAST, *extra, f"trainer.callbacks=[tests.support.faults.{fault}]"],
                                   cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: kill it and its children
        try:
            deadline = time.monotonic() + 120
            # Killed only once the pause has begun: without it, the kill would race the publish.
            while not (staged.exists() and f"({fault})" in (tmp_path / "killed.log").read_text()):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "step 4 was never staged"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    assert latest_complete_checkpoint(checkpoints) == checkpoints / "step-0000002" / "checkpoint.ckpt"
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [2]
    assert os.readlink(checkpoints / "last") == "step-0000002"
    assert staged.parent.is_dir() and not (staged.parent / "COMPLETE").exists()
    assert not (checkpoints / "step-0000004").exists()
    before = train_steps_logged(run_dir)
    assert before[:2] == [1, 2]

    if strategy == "fsdp":  # killed inside the DCP save: shards on disk, no index, no meta.pt
        assert list(staged.glob("*.distcp")) and not (staged / ".metadata").exists()
    rerun = subprocess.run([str(BIN / "sd3train-train"), *FAST, *extra], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"Restoring states from the checkpoint path at {Path('runs/tiny_cpu/main/checkpoints/step-0000002/checkpoint.ckpt')}" in output
    assert "removed runs/tiny_cpu/main/checkpoints/.staging-step-0000004" in output
    # The rerun trains steps 3..6 once each, appended after what the killed run had logged.
    assert train_steps_logged(run_dir)[len(before):] == [3, 4, 5, 6]
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [4, 6]  # keep_checkpoints=2
    assert os.readlink(checkpoints / "last") == "step-0000006"
    assert not [path.name for path in checkpoints.iterdir() if path.name.startswith(".")]
    final = read_lightning_checkpoint(checkpoints / "last")
    assert final["global_step"] == 6
    assert "max_steps: 6" in (checkpoints / "last" / "config.yaml").read_text()
