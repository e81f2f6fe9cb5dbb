"""Faults the robustness tests inject into a real training run, as Lightning callbacks.

In the test process: `fit(cfg, extra_callbacks=(NanLossAt({3}),))`. In a subprocess (console script,
srun task), by dotted path: `sd3train-train ... 'trainer.callbacks=[tests.support.faults.PauseBeforePublish]'`,
with the repository root on PYTHONPATH (tests/conftest.py puts it there for every child process).
The product has no setting for any of them.
"""

from __future__ import annotations

import functools
import time

import lightning as L
import torch


class NanLossAt(L.Callback):
    """The MM-DiT's prediction becomes NaN at these optimizer steps (1-based), so the loss and every
    gradient are NaN: what a diverging step looks like to the non-finite guard."""

    def __init__(self, steps):
        self.steps = set(steps)
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps and self._hook is None:
            self._hook = pl_module.mmdit.register_forward_hook(
                lambda module, args, output: output * torch.tensor(float("nan"), device=output.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class ReseedOnResume(L.Callback):
    """A resumed run draws its noise, timesteps and dropout from other random streams: what a
    trainer that does not restore its generators does (the resume tests' negative control)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            # Other names of the per-step streams; the config (saved in later checkpoints) is left alone.
            streams = pl_module._step_stream
            pl_module._step_stream = lambda batch_idx: streams(batch_idx) + "-reseeded"


class SlowSteps(L.Callback):
    """Sleep after every training batch, so a test can signal a run the tiny model would otherwise
    finish before the signal arrives."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


slow_steps_400ms = functools.partial(SlowSteps, 0.4)
slow_steps_500ms = functools.partial(SlowSteps, 0.5)


class PauseBeforePublish(L.Callback):
    """Hold every checkpoint but the first this process writes for `seconds` between writing it and
    publishing it (AtomicCheckpoint.before_publish), so a test can kill the run mid-checkpoint and
    find the first one to fall back on."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self.written = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        from sd3train.lit.checkpointing import AtomicCheckpoint

        checkpointers = [callback for callback in trainer.callbacks if isinstance(callback, AtomicCheckpoint)]
        assert checkpointers, "PauseBeforePublish needs sd3train's AtomicCheckpoint among the callbacks"
        if self.pause not in checkpointers[0].before_publish:
            checkpointers[0].before_publish.append(self.pause)

    def pause(self, step: int, staging_dir) -> None:
        self.written += 1
        if self.written > 1:
            print(f"{staging_dir} written; publishing in {self.seconds:g} s (PauseBeforePublish)", flush=True)
            time.sleep(self.seconds)


class PauseMidDCPSave(L.Callback):
    """Under strategy=fsdp, hold every DCP checkpoint but the first this process writes for
    `seconds` after each rank has written its shards and before the DCP index (.metadata) and
    Lightning's meta.pt exist: a kill then lands in the middle of `torch.distributed.checkpoint.save`."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self.saves = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        original, fault = FileSystemWriter.finish, self

        def finish(writer, metadata, results):  # runs on the coordinating rank, shards already on disk
            fault.saves += 1
            if fault.saves > 1:
                print(f"{writer.path}: shards written, index not yet (PauseMidDCPSave)", flush=True)
                time.sleep(fault.seconds)
            return original(writer, metadata, results)

        FileSystemWriter.finish = finish
