"""Stop for preemption at a step boundary, with a checkpoint every rank wrote at the same step,
then requeue the job.

The signal reaches each rank on its own and at its own moment (sd3train/runtime/preemption.py
records it). After every optimizer step the ranks reduce "has any of us been asked to stop?"; the
answer is the same on all of them, so they all save `checkpoints/step-N/` for the same N (the
collective AtomicCheckpoint save) and stop there. Nothing is trained after the checkpoint, so the
requeued job, resuming from it, trains (and logs) every later step exactly once. Once `fit` has
returned, `requeue_after_preemption` closes the W&B run and rank 0 requeues the SLURM job.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from sd3train.lit.checkpointing import AtomicCheckpoint
from sd3train.runtime import preemption
from sd3train.runtime.exit_codes import FINISHED, PREEMPTED_EXIT_CODE


class StopOnPreemption(L.Callback):
    """Poll for a stop request at each step boundary; on one, checkpoint on all ranks and stop.

    `stopped_at` is the step checkpointed for the stop (None while training runs on).
    """

    def __init__(self, checkpointer: AtomicCheckpoint):
        self.checkpointer = checkpointer
        self.stopped_at: Optional[int] = None
        self._polled_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        # The step resumed from (or 0) is no boundary to stop at: micro-batches of the next step
        # may already be under way when gradients are accumulated.
        self._polled_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Under gradient accumulation this runs per micro-batch: poll once, right after each
        # optimizer step. The last step needs no stop: training ends and is checkpointed anyway.
        if step == self._polled_step or self.stopped_at is not None or step >= trainer.max_steps:
            return
        self._polled_step = step
        local = preemption.stop_requested() is not None
        # Collective: every rank calls it at every step, and all get the same answer.
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        request = preemption.stop_requested()
        what = f"signal {request.signal_number}" if request else "a stop request on another rank"
        if self.checkpointer.save_step(trainer, pl_module, step) is None:
            # A step skipped as non-finite is never checkpointed: stop after the next good one.
            rank_zero_info(f"preemption ({what}): step {step} cannot be checkpointed, trying the next")
            return
        rank_zero_info(f"preemption ({what}): checkpointed step {step} on all ranks; stopping")
        self.stopped_at = step
        trainer.should_stop = True
        _ignore_sigterm_from_now(trainer)
        if not _validation_due(trainer):
            # Lightning validates whenever should_stop is set (for early stopping): an unscheduled
            # pass here would spend the time left before the limit, and the requeue waits for it.
            trainer.fit_loop.epoch_loop._skip_next_val = True


def _ignore_sigterm_from_now(trainer) -> None:
    """The requeue makes SLURM send SIGTERM to every task, some maybe still shutting down (ranks
    stop together at the checkpoint, not at exit). Nothing is left to lose, so each task finishes
    its exit instead of dying mid-way (SLURM's SIGKILL, KillWait later, still ends a hung one):
    SIGTERM is ignored now, and stays so when Lightning puts back the handlers it found at fit
    start (its own would also run a collective inside the handler)."""
    preemption.ignore_from_now(signal.SIGTERM)
    originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(originals, dict) and signal.SIGTERM in originals:
        originals[signal.SIGTERM] = signal.SIG_IGN


def _validation_due(trainer) -> bool:
    """Whether the batch just ended is one Lightning validates after anyway (val_check_interval
    counted in batches, check_val_every_n_epoch=None, as sd3train/lit/trainer.py sets them)."""
    every = trainer.val_check_batch
    if not isinstance(every, int) or every <= 0:
        return False
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0


def _global_rank() -> int:
    """This process's rank once `fit` has returned: from the process group while there is one,
    else (a strategy that destroys it at teardown, CPU DeepSpeed) from the launcher's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def requeue_after_preemption(step: int) -> int:
    """After the stop checkpoint at `step`: close the W&B run, wait for every rank, then rank 0
    requeues the SLURM job (which ends every task). Exit status 0 when requeued, else
    PREEMPTED_EXIT_CODE, the same on every rank."""
    import torch.distributed as dist

    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()  # flushed now: SLURM's SIGTERM follows the requeue
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001  (an upload failing must not keep the job from its requeue)
        print(f"sd3train-train: closing the W&B run failed ({type(error).__name__}: {error}); requeueing anyway",
              file=sys.stderr, flush=True)
    # SIGTERM, which the requeue makes SLURM send to every task, is ignored since the stop
    # (StopOnPreemption): each task still says what happened and exits with its status.
    grouped = dist.is_available() and dist.is_initialized()
    if grouped:
        dist.barrier()
    status = FINISHED
    if _global_rank() == 0:
        requeued, message = preemption.requeue()
        if requeued:
            print(f"sd3train-train: stopped for preemption at step {step} (checkpoint saved); {message}", flush=True)
        else:
            print(f"sd3train-train: stopped for preemption at step {step} (checkpoint saved) but {message}; run "
                  "the same command again to continue from it (trainer.resume=auto)", file=sys.stderr, flush=True)
            status = PREEMPTED_EXIT_CODE
    if grouped:
        # The other ranks stay until rank 0 has requeued: under `srun --kill-on-bad-exit` one of
        # them failing on its way out would otherwise kill rank 0 before the requeue.
        answer = [status]
        dist.broadcast_object_list(answer, src=0)
        status = answer[0]
    return status
