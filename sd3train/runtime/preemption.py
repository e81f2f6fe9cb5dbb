"""Preemption: remember that SLURM asked the job to stop, and requeue it.

    install_handler()          # first thing in the entry point: USR1 is fatal by default
    ...
    if stop_requested(): ...   # polled at step boundaries (sd3train/lit/preemption.py)
    requeue()                  # `scontrol requeue <job>`: (True, message) when SLURM accepted it

SLURM sends USR1 to the training tasks on `scancel --signal=USR1 <job>` and, with
`--signal=USR1@<lead>`, `lead` seconds before the time limit (sbatch's manual allows up to 60 s
earlier; slurmctld checks about every 30 s). A requeued job can be signalled again while Python is still importing, so the handler
goes in before anything slow. The handler only records the request; the training loop decides when
to act on it (a signal handler cannot take part in a collective checkpoint).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

PREEMPTION_SIGNAL = signal.SIGUSR1
_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


@dataclass
class StopRequest:
    signal_number: int
    received_at: float  # time.time() when the signal arrived


_request: Optional[StopRequest] = None


def _record(signal_number: int, _frame) -> None:
    global _request
    if _request is None:
        _request = StopRequest(signal_number, time.time())


def install_handler(signal_number: int = PREEMPTION_SIGNAL) -> None:
    """Record `signal_number` instead of dying of it. Main thread only (Python's rule)."""
    signal.signal(signal_number, _record)


def ignore_from_now(signal_number: int = PREEMPTION_SIGNAL) -> None:
    """Once training is over there is nothing to stop: a late signal (the time-limit warning while
    the job shuts down) must not kill the process. SIG_IGN, unlike a Python handler, stays in
    place while the interpreter shuts down."""
    signal.signal(signal_number, signal.SIG_IGN)


def stop_requested() -> Optional[StopRequest]:
    """The first stop request this process received since the last `clear()`, if any."""
    return _request


def clear() -> None:
    global _request
    _request = None


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The id `scontrol requeue` takes: `<array job>_<task>` in an array job, else the job id."""
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{array_job}_{environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = environ.get("SLURM_JOB_ID")
    return job if job and _JOB_ID.match(job) else None


def requeue(environ: Mapping[str, str] = os.environ, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Ask SLURM to requeue this job: (accepted, what happened). SLURM then stops the job's tasks
    (SIGTERM, SIGKILL after KillWait) and starts the batch script again under the same job id."""
    job = slurm_job_id(environ)
    if job is None:
        return False, "not a SLURM job (no SLURM_JOB_ID)"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return False, f"scontrol not found; job {job} was not requeued"
    except subprocess.TimeoutExpired:
        return False, f"scontrol requeue {job} did not answer in {timeout_s:g} s"
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        return False, f"scontrol requeue {job} failed: {reason} (was the job submitted with --requeue?)"
    return True, f"requeued SLURM job {job}"
