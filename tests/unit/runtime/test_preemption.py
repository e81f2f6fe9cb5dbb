"""The preemption signal is recorded, not fatal; the requeue names the job SLURM knows."""

from __future__ import annotations

import os
import signal

from sd3train.runtime import preemption


def test_the_signal_is_recorded_instead_of_killing_the_process():
    previous = signal.getsignal(preemption.PREEMPTION_SIGNAL)
    try:
        preemption.clear()
        preemption.install_handler()
        assert preemption.stop_requested() is None
        os.kill(os.getpid(), preemption.PREEMPTION_SIGNAL)
        first = preemption.stop_requested()
        assert first is not None and first.signal_number == signal.SIGUSR1
        os.kill(os.getpid(), preemption.PREEMPTION_SIGNAL)
        assert preemption.stop_requested() is first  # the first request is the one kept
        preemption.clear()
        assert preemption.stop_requested() is None
    finally:
        signal.signal(preemption.PREEMPTION_SIGNAL, previous)
        preemption.clear()


def test_job_id_for_plain_and_array_jobs():
    assert preemption.slurm_job_id({"SLURM_JOB_ID": "1234"}) == "1234"
    array = {"SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "6"}
    assert preemption.slurm_job_id(array) == "1234_6"
    assert preemption.slurm_job_id({}) is None
    assert preemption.slurm_job_id({"SLURM_JOB_ID": "12; rm -rf /"}) is None


def test_requeue_outside_slurm_says_why():
    requeued, message = preemption.requeue({})
    assert not requeued and "not a SLURM job" in message


def test_after_training_a_late_signal_is_ignored():
    previous = signal.getsignal(preemption.PREEMPTION_SIGNAL)
    try:
        preemption.clear()
        preemption.ignore_from_now()
        os.kill(os.getpid(), preemption.PREEMPTION_SIGNAL)  # would end the process under SIG_DFL
        assert preemption.stop_requested() is None
        assert signal.getsignal(preemption.PREEMPTION_SIGNAL) == signal.SIG_IGN
    finally:
        signal.signal(preemption.PREEMPTION_SIGNAL, previous)
