"""On a real SLURM (CI starts one with .ci/slurm/start.sh): the launch template, submitted by
sd3train-submit for the tiny experiment, trains with 2 ranks to completion; a preemption signal
makes it checkpoint, requeue itself and finish from there with every step trained once."""

from __future__ import annotations

import csv
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.slurm_jobs import job_field, requires_slurm, submit, wait_for

pytestmark = requires_slurm()


def tiny_job(tmp_path: Path, *extra: str, shapes: Path, tasks: int = 2, nodes: int = 1,
             time_limit: str = "00:10:00") -> list[str]:
    """sd3train-submit arguments for a tiny CPU job with `tasks` ranks on each of `nodes` nodes."""
    return [
        "--nodes", str(nodes), "--gpus-per-node", "0", "--tasks-per-node", str(tasks), "--cpus-per-task", "1",
        "--time", time_limit,
        "--job-name", "sd3-ci", "experiment=tiny_cpu", "trainer.accelerator=cpu", "model.depth=1",
        "data.batch_size=4", "data.num_workers=0", f"data.shards={shapes}/train-{{000000..000003}}.tar",
        "data.val_shards=null", "eval.prompts=[]", "eval.samples_per_caption=0", "trainer.progress_bar=false",
        f"paths.runs_dir={tmp_path / 'runs'}", *extra,
    ]


def logged_steps(metrics: Path) -> list[int]:
    """The optimizer steps (1-based) with a training loss row in metrics.csv, in file order."""
    with metrics.open(newline="") as file:
        return [int(row["step"]) + 1 for row in csv.DictReader(file) if row.get("train/loss")]


def test_two_task_job_trains_to_completion_on_both_ranks(small_shapes, tmp_path):
    job = submit(tiny_job(tmp_path, "trainer.max_steps=4", "logger.wandb=false", "trainer.checkpoint_every_n_steps=2",
                          shapes=small_shapes), cwd=tmp_path)
    wait_for(job)
    log = (tmp_path / f"slurm-sd3-ci-{job}.out").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in log, log[-3000:]
    assert (tmp_path / "runs" / "tiny_cpu" / "main" / "checkpoints" / "step-0000004" / "COMPLETE").is_file()
    assert (tmp_path / "runs" / "submit").is_dir()  # the submitted script is kept


@requires_slurm(min_nodes=2)[1]  # its skip mark: two slurmd nodes (SLURM_FAKE_NODES=2)
def test_two_node_job_trains_with_one_rank_per_node(small_shapes, tmp_path):
    job = submit(tiny_job(tmp_path, "trainer.max_steps=3", "logger.wandb=false", tasks=1, nodes=2,
                          shapes=small_shapes), cwd=tmp_path)
    wait_for(job)
    log = (tmp_path / f"slurm-sd3-ci-{job}.out").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert job_field(job, "NodeList") == "n[1-2]" and job_field(job, "JobState") == "COMPLETED"
    assert (tmp_path / "runs" / "tiny_cpu" / "main" / "checkpoints" / "step-0000003" / "COMPLETE").is_file()


# Where each rank's part of a checkpoint lands: DeepSpeed's per-rank optimizer shards, DCP's per-rank files.
RANK_FILES = {"zero2": ("*optim_states.pt", "zero_pp_rank_{}_"), "fsdp": ("*.distcp", "__{}_")}


@pytest.mark.parametrize("strategy", list(RANK_FILES))
def test_usr1_checkpoints_on_all_ranks_requeues_and_trains_each_step_once(small_shapes, tmp_path, strategy):
    max_steps = 16
    run_dir = tmp_path / "runs" / "tiny_cpu" / "main"
    job = submit(tiny_job(
        tmp_path, f"trainer.max_steps={max_steps}", f"strategy={strategy}", "trainer.log_every_n_steps=1",
        # No scheduled checkpoint before the end: the one resumed from is the preemption's.
        "trainer.checkpoint_every_n_steps=1000", "trainer.callbacks=[tests.support.faults.slow_steps_400ms]",
        "logger.wandb=true", shapes=small_shapes,
    ), cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.csv").is_file() and len(logged_steps(run_dir / "metrics.csv")) >= 3):
        assert time.monotonic() < deadline, "training did not start within 180 s"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(job)

    log = (tmp_path / f"slurm-sd3-ci-{job}.out").read_text()
    stops = re.findall(r"stopped for preemption at step (\d+) \(checkpoint saved\); requeued SLURM job " + job, log)
    assert len(stops) == 1, log[-4000:]  # rank 0 requeued, once; rank 1 waited for it
    assert "Terminated" not in log  # the requeue's SIGTERM did not cut the tasks' exit short
    stopped_at = int(stops[0])
    assert 3 <= stopped_at < max_steps
    # Both ranks wrote their shard of the stop checkpoint, and the requeued job resumed from it.
    stop_dir = run_dir / "checkpoints" / f"step-{stopped_at:07d}"
    assert (stop_dir / "COMPLETE").is_file()
    pattern, rank_prefix = RANK_FILES[strategy]
    shards = sorted(path.name for path in (stop_dir / "checkpoint.ckpt").rglob(pattern))
    assert len(shards) == 2 and all(name.startswith(rank_prefix.format(rank)) for rank, name in enumerate(shards)), shards
    assert f"Restoring states from the checkpoint path at {stop_dir / 'checkpoint.ckpt'}" in log, log[-4000:]
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "COMPLETED"
    assert f"`Trainer.fit` stopped: `max_steps={max_steps}` reached." in log
    # Every step trained and logged once: none lost, none repeated after the requeue.
    assert logged_steps(run_dir / "metrics.csv") == list(range(1, max_steps + 1))
    # One W&B run id for both parts of the job.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1, runs


@pytest.mark.slow
def test_time_limit_signal_lead_preempts_and_the_requeued_job_finishes(small_shapes, tmp_path):
    # USR1 comes 60 s before the 2-minute limit (up to 30 s earlier); 120 steps of 0.5 s outlast it,
    # so the job is stopped at least once and each part makes progress until all steps are done.
    max_steps = 120
    run_dir = tmp_path / "runs" / "tiny_cpu" / "main"
    job = submit([*tiny_job(tmp_path, f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=1",
                            "trainer.checkpoint_every_n_steps=1000", "trainer.callbacks=[tests.support.faults.slow_steps_500ms]",
                            "logger.wandb=true", shapes=small_shapes, time_limit="00:02:00"),
                  "--signal-lead", "60"], cwd=tmp_path)
    wait_for(job, timeout=900)
    log = (tmp_path / f"slurm-sd3-ci-{job}.out").read_text()
    stops = [int(step) for step in re.findall(r"stopped for preemption at step (\d+) \(checkpoint saved\); requeued", log)]
    assert stops and stops == sorted(stops) and stops[-1] < max_steps, log[-4000:]
    assert job_field(job, "Restarts") == str(len(stops)) and job_field(job, "JobState") == "COMPLETED"
    assert logged_steps(run_dir / "metrics.csv") == list(range(1, max_steps + 1))
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(stops) + 1 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1, runs
