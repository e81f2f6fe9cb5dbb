"""Preemption without SLURM: USR1 to one rank of a 2-rank run stops both at the same step with a
checkpoint (exit status 6: nothing to requeue it); running the command again finishes the run with
every step trained and logged once, in the same W&B run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sd3train.checkpoint.step_dirs import latest_complete_checkpoint, read_marker
from sd3train.runtime.exit_codes import PREEMPTED_EXIT_CODE
from tests.support.processes import BIN, finish, launch

MAX_STEPS = 10


def logged_steps(metrics: Path) -> list[int]:
    with metrics.open(newline="") as file:
        return [int(row["step"]) + 1 for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.slow  # about 34 s; tests/integration/test_slurm_training.py covers USR1 under a real SLURM by default
def test_usr1_to_rank_zero_stops_both_ranks_at_one_checkpoint_and_the_rerun_finishes(small_shapes, tmp_path):
    run_dir = tmp_path / "runs" / "tiny_cpu" / "main"
    command = [
        str(BIN / "sd3train-train"), "experiment=tiny_cpu", "trainer.accelerator=cpu", "trainer.devices=2",
        "strategy=ddp", f"trainer.max_steps={MAX_STEPS}", "model.depth=1", "data.batch_size=4",
        "data.num_workers=0", f"data.shards={small_shapes}/train-{{000000..000003}}.tar", "data.val_shards=null",
        "eval.prompts=[a red circle]", "eval.samples_per_caption=0", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=1000", "logger.wandb=true", f"paths.runs_dir={tmp_path / 'runs'}",
    ]
    first = launch([*command, "trainer.callbacks=[tests.support.faults.slow_steps_400ms]"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.csv").is_file() and len(logged_steps(run_dir / "metrics.csv")) >= 2):
            assert first.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGUSR1)  # rank 0 only: Lightning started rank 1 as its child
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    assert "preemption (signal 10): checkpointed step" in output
    stop = latest_complete_checkpoint(run_dir / "checkpoints")
    stopped_at = read_marker(stop.parent)["step"]
    assert 2 <= stopped_at < MAX_STEPS
    assert f"stopped for preemption at step {stopped_at} (checkpoint saved) but not a SLURM job" in output
    assert logged_steps(run_dir / "metrics.csv") == list(range(1, stopped_at + 1))
    assert not (run_dir / "samples").exists()  # the end-of-training previews wait for the real end

    output = finish(launch(command, cwd=tmp_path))
    assert f"Restoring states from the checkpoint path at {stop}" in output
    assert logged_steps(run_dir / "metrics.csv") == list(range(1, MAX_STEPS + 1))
    assert (run_dir / "samples" / f"step-{MAX_STEPS}").is_dir()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1, runs
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""  # nothing left running
