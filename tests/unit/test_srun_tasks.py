"""Under srun, one task per rank takes rank, world size and master from SLURM whatever the job's
name (Lightning's own check refuses jobs named `bash` or `interactive`)."""

from __future__ import annotations

import pytest

from sd3train.lit.trainer import srun_tasks
from sd3train.paths import sweep_run_name


@pytest.mark.parametrize("job_name", ["sd3train", "bash", "interactive"])
def test_an_srun_task_per_rank_takes_rank_and_world_from_slurm_whatever_the_job_name(monkeypatch, job_name):
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert srun_tasks(world_size=2)


def test_an_interactive_shell_with_one_task_for_two_devices_is_left_to_lightning(monkeypatch):
    # `srun --pty bash`, then training on 2 devices: Lightning starts the second process itself.
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert not srun_tasks(world_size=2)


def test_outside_slurm_nothing_is_taken_from_it(monkeypatch):
    for name in ("SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert not srun_tasks(world_size=1)


def test_a_sweep_jobs_run_name_is_stable_for_its_overrides_and_differs_for_others():
    name = sweep_run_name("main", 0, ["optim.lr=1e-4", "experiment=x"])
    assert name.startswith("main-0-") and len(name) == len("main-0-") + 8
    assert sweep_run_name("main", 0, ["experiment=x", "optim.lr=1e-4"]) == name  # a requeue: same run
    assert sweep_run_name("main", 0, ["optim.lr=3e-4", "experiment=x"]) != name  # another sweep's job 0
