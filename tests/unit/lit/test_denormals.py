"""Subnormal floats read as zero while a CPU module fits, and normally again after."""

from __future__ import annotations

import lightning as L
import torch

from sd3train.lit.denormals import FlushDenormals
from tests.support.tiny_lightning import TinyModule

SUBNORMAL = 1e-40  # below float32's smallest normal number, 1.2e-38


def _reads_as_zero() -> bool:
    return float(torch.tensor([SUBNORMAL]) * 1.0) == 0.0


class Probe(L.Callback):
    def __init__(self):
        self.flushed: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.flushed.append(_reads_as_zero())


def _fit(*callbacks: L.Callback) -> Probe:
    probe = Probe()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, probe])
    trainer.fit(TinyModule())
    return probe


def test_subnormals_flush_during_a_cpu_fit_only():
    assert not _reads_as_zero()
    assert _fit(FlushDenormals()).flushed == [True, True]
    assert not _reads_as_zero()  # restored
    assert _fit().flushed == [False, False]  # the control: without the callback they stay
