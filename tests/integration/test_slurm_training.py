"""On a real SLURM (CI starts one with .ci/slurm/start.sh): the launch template, submitted by
sd3train-submit for the tiny experiment with 2 tasks, runs a 2-rank training job to completion."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the test environment's console scripts


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch, sinfo) on PATH; CI starts one with .ci/slurm/start.sh"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    return None if "idle" in states or "mixed" in states else f"no idle SLURM node (sinfo says {states.split()})"


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_slurm_problem() is not None, reason=str(_slurm_problem()))]


def wait_for(job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued or running after {timeout} s"
        time.sleep(1)


def test_two_task_job_trains_to_completion_on_both_ranks(small_shapes, tmp_path):
    args = [
        str(BIN / "sd3train-submit"), "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
        "--time", "00:10:00", "--job-name", "sd3-ci", "experiment=tiny_cpu", "trainer.accelerator=cpu",
        "trainer.max_steps=4", "model.depth=1", "data.batch_size=4", "data.num_workers=0",
        f"data.shards={small_shapes}/train-{{000000..000003}}.tar", "data.val_shards=null", "eval.prompts=[]",
        "eval.num_colour_prompts=0", "logger.wandb=false", "trainer.progress_bar=false",
        "trainer.checkpoint_every_n_steps=2", f"paths.runs_dir={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "SD3TRAIN_VENV": str(BIN.parent), "WANDB_MODE": "offline"}
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    wait_for(job)
    log = (tmp_path / f"slurm-sd3-ci-{job}.out").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in log, log[-3000:]
    assert (tmp_path / "runs" / "tiny_cpu" / "main" / "checkpoints" / "step-0000004" / "COMPLETE").is_file()
    assert (tmp_path / "runs" / "submit").is_dir()  # the submitted script is kept
