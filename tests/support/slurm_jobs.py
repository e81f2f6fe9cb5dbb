"""Submitting to the real SLURM that CI starts (.ci/slurm/start.sh), and watching the jobs.

    pytestmark = requires_slurm()                   # marked `slurm`, skipped (saying why) without one,
                                                     # but run (and failing) when SD3TRAIN_REQUIRE_SLURM=1
    job = submit(["--tasks-per-node", "2", ...], cwd=tmp_path)
    wait_for(job)                                    # until squeue no longer lists it
"""

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
SLURM_ENV = {**os.environ, "SD3TRAIN_VENV": str(BIN.parent), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def slurm_problem(min_nodes: int = 1) -> str | None:
    """Why jobs cannot be submitted here (None when they can)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch, sinfo) on PATH; CI starts one with .ci/slurm/start.sh"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    usable = [state for state in states.split() if state in ("idle", "mixed", "allocated")]
    if len(usable) < min_nodes:
        return f"{min_nodes} SLURM node(s) needed, sinfo lists {states.split()} (SLURM_FAKE_NODES=2 .ci/slurm/start.sh)"
    return None


# Set by .ci/run: there the tests run (and fail, saying why) instead of being skipped when SLURM is
# not up, so a CI whose SLURM did not start cannot pass without them.
REQUIRED = os.environ.get("SD3TRAIN_REQUIRE_SLURM") == "1"


def requires_slurm(min_nodes: int = 1) -> list:
    problem = slurm_problem(min_nodes)
    return [pytest.mark.slurm, pytest.mark.skipif(problem is not None and not REQUIRED, reason=str(problem))]


def submit(args: list[str], cwd: Path, program: str = "sd3train-submit") -> str:
    """Run `program args` (sd3train-submit by default) in `cwd`; the submitted job's id."""
    result = subprocess.run([str(BIN / program), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                            env=SLURM_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def queued(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def wait_for(job: str, timeout: float = 300) -> None:
    """Until the job has left the queue (a requeued job stays in it while pending again)."""
    deadline = time.monotonic() + timeout
    while queued(job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} still queued or running after {timeout} s (cancelled)")
        time.sleep(1)


def job_field(job: str, name: str) -> str | None:
    """A `scontrol show job` field (kept MinJobAge seconds after the job ends; no sacct here)."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", text)
    return match.group(1) if match else None
