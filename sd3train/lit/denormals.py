"""Subnormal floats read as zero while a CPU run fits (the x86 FTZ/DAZ flags).

With the LR still warming up, the squared gradients of the context stream's MLPs (behind
adaLN-zero gates that start at zero) fall below float32's smallest normal number (1.2e-38) in
Adam's second moment, and x86 cores handle such subnormal values through a slow microcode path:
at depth 4, 256^2, bf16 on one thread, fused AdamW took 22 ms a step instead of 12 ms and the
whole step 175 ms instead of 158 ms (README, Performance). Values that small change nothing a
model learns; GPUs flush them in their fast paths too.

The flag is per thread: this callback sets it on the thread that fits (the only one with one
intra-op thread) and restores it after; the entry point also sets it before anything is built,
so the intra-op pool, whose threads copy the flag when they start, inherits it (sd3train/train.py).
"""

from __future__ import annotations

import lightning as L
import torch


def flush_before_threads_start(accelerator: str) -> None:
    """Turn the flag on for a CPU run (`trainer.accelerator` cpu, or auto without CUDA) before the
    intra-op threads start, so they inherit it."""
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        torch.set_flush_denormal(True)


class FlushDenormals(L.Callback):
    """On while a CPU module fits, off after (a GPU run is left alone)."""

    def __init__(self):
        self._set = False

    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cpu":
            self._set = torch.set_flush_denormal(True)  # False where the CPU cannot

    def _restore(self) -> None:
        if self._set:
            torch.set_flush_denormal(False)
            self._set = False

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
