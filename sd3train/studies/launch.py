"""Run a study's jobs as Hydra multiruns of sd3train-train, one per arm over its seeds.

    sd3train-train -m <base> <arm> <command line> experiment_name=<study> run_name='<arm>-seed${trainer.seed}' \
        paths.runs_dir=runs/studies paths.sweep_suffix=false trainer.seed=0,1 hydra.sweep.dir=...

With Hydra's basic launcher (the default) the jobs of an arm train one after another in one process
and the arms follow each other. With another launcher (`hydra/launcher=slurm`: submitit) every arm's
multirun is started at once, so the cluster runs all the jobs side by side; each multirun waits for
its own jobs.

A job whose training fails (sd3train-train exits with an error: a non-finite loss, out of memory)
ends its multirun; it is recorded in failed.json with its exit status and the arm's other seeds run
in a new multirun, so one diverging run costs no other. One study runs at a time in its folder (a
lock file): a second sd3train-study on the same study stops at once.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from sd3train.studies.plan import Job, StudyPlan, arm_overrides, override_key

LOCK_FILE = ".lock"
_FAILED_WRITES = threading.Lock()  # arms run in threads side by side; failed.json is read, then rewritten


class StudyBusyError(RuntimeError):
    pass


@contextmanager
def study_lock(root: Path):
    """Held while a study trains; StudyBusyError when another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusyError(f"another sd3train-study is running this study ({root / LOCK_FILE} is locked)") from None
        yield


def arm_command(plan: StudyPlan, arm: str, seeds: list[int]) -> list[str]:
    """The sd3train-train multirun that trains `arm` for `seeds` (arguments, no shell)."""
    overrides = arm_overrides(plan.spec, arm, plan.extra, plan.runs_dir)
    sweep_dir = plan.root / ".multirun" / arm
    return [sys.executable, "-m", "sd3train.train", "-m", *overrides,
            f"trainer.seed={','.join(str(seed) for seed in seeds)}",
            f"run_name={arm}-seed${{trainer.seed}}",  # resolved per job by Hydra
            f"hydra.sweep.dir={sweep_dir}"]


def uses_basic_launcher(overrides: list[str]) -> bool:
    """Whether `overrides` (the study's base and the command line) leave Hydra's basic launcher on."""
    chosen = [o.split("=", 1)[1] for o in overrides if override_key(o) == "hydra/launcher"]
    return not chosen or chosen[-1] == "basic"


def _failed_job(plan: StudyPlan, jobs: list[Job]) -> list[Job]:
    """After a multirun of `jobs` (one arm) exited with an error: the jobs it failed on. One after
    another, the first unfinished one that started (or the first unfinished); side by side, every
    unfinished one."""
    states = plan.states()
    unfinished = [job for job in jobs if states[job] != "done"]
    if not uses_basic_launcher([*plan.spec.base, *plan.extra]):
        return unfinished
    started = [job for job in unfinished if job.run_dir.is_dir()]
    return (started or unfinished)[:1]


def run_arm(plan: StudyPlan, jobs: list[Job], log=print) -> int:
    """Train one arm's `jobs`, again without a failed job until each is done or failed; the last status."""
    status = 0
    while jobs:
        command = arm_command(plan, jobs[0].arm, [job.seed for job in jobs])
        log(f"arm {jobs[0].arm}: seeds {[job.seed for job in jobs]}: {' '.join(command[1:])}")
        status = subprocess.run(command).returncode
        if status == 0:
            return 0
        failed = _failed_job(plan, jobs)
        for job in failed:
            with _FAILED_WRITES:
                plan.record_failed(job, status)
            log(f"{job.run_name}: failed (exit status {status})")
        jobs = [job for job in jobs if job not in failed and plan.states()[job] != "done"]
    return status


def run_jobs(plan: StudyPlan, jobs: list[Job], log=print) -> dict[str, int]:
    """Train `jobs` (each arm's seeds as one multirun, under the study's lock); each arm's last exit status."""
    by_arm: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_arm[job.arm].append(job)
    with study_lock(plan.root):
        plan.forget_failed(jobs)  # retried ones
        if uses_basic_launcher([*plan.spec.base, *plan.extra]):
            return {arm: run_arm(plan, arm_jobs, log) for arm, arm_jobs in by_arm.items()}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(by_arm)) as pool:  # every arm's multirun at once
            futures = {arm: pool.submit(run_arm, plan, arm_jobs, log) for arm, arm_jobs in by_arm.items()}
            return {arm: future.result() for arm, future in futures.items()}
