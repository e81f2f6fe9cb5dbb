"""StopOnPreemption in a real Lightning fit: a USR1 during a step stops training right after it,
with that step checkpointed; never mid-accumulation, never at a step skipped as non-finite."""

from __future__ import annotations

import os
import signal
import warnings

import lightning as L
import pytest
import torch

from sd3train.checkpoint.step_dirs import complete_checkpoints
from sd3train.lit.checkpointing import AtomicCheckpoint
from sd3train.lit.preemption import StopOnPreemption
from sd3train.runtime import preemption
from tests.support.config import tiny_config
from tests.support.tiny_lightning import TinyModule


class SignalAt(L.Callback):
    """Sends this process the preemption signal as micro-batch `batch_index` starts."""

    def __init__(self, batch_index: int):
        self.batch_index = batch_index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_index:
            os.kill(os.getpid(), preemption.PREEMPTION_SIGNAL)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    return tiny_config(root, root / "runs")


@pytest.fixture(autouse=True)
def handler():
    previous = signal.getsignal(preemption.PREEMPTION_SIGNAL)
    previous_term = signal.getsignal(signal.SIGTERM)
    preemption.clear()
    preemption.install_handler()
    yield
    signal.signal(preemption.PREEMPTION_SIGNAL, previous)
    signal.signal(signal.SIGTERM, previous_term)
    preemption.clear()


def fit(tmp_path, cfg, signal_batch: int, max_steps: int = 8, module=None, **trainer_args):
    checkpointer = AtomicCheckpoint(tmp_path, cfg, every_n_steps=100, keep=10)
    stop = StopOnPreemption(checkpointer)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        callbacks=[checkpointer, stop, SignalAt(signal_batch)], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, **trainer_args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*|.*skipped as non-finite.*")
        trainer.fit(module or TinyModule())
    return stop, trainer, [step for step, _ in complete_checkpoints(tmp_path / "checkpoints")]


def test_a_signal_during_a_step_stops_after_it_with_its_checkpoint(tmp_path, cfg):
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=2)  # during step 3
    assert stop.stopped_at == 3 and trainer.global_step == 3 and saved == [3]
    # The requeue's SIGTERM cannot cut the exit short, even after Lightning restored its handlers.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_without_a_stop_sigterm_is_left_as_it_was(tmp_path, cfg):
    before = signal.getsignal(signal.SIGTERM)
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=100)
    assert stop.stopped_at is None and signal.getsignal(signal.SIGTERM) == before


def test_under_accumulation_the_stop_waits_for_the_optimizer_step(tmp_path, cfg):
    # Micro-batches 0-1 are step 1, 2-3 step 2: a signal as micro-batch 2 starts stops after step 2.
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=2, accumulate_grad_batches=2)
    assert stop.stopped_at == 2 and trainer.global_step == 2 and saved == [2]


def test_a_step_skipped_as_non_finite_is_not_the_stop_the_next_one_is(tmp_path, cfg):
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=2, module=TinyModule(poisoned={3}))
    assert stop.stopped_at == 4 and saved == [4]


def test_a_signal_in_the_last_step_just_lets_training_end(tmp_path, cfg):
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=7, max_steps=8)
    assert stop.stopped_at is None and trainer.global_step == 8 and saved == [8]


class ValidatedModule(TinyModule):
    def __init__(self):
        super().__init__()
        self.validated_at: list[int] = []

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated_at.append(self.global_step)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=4)


@pytest.mark.parametrize("signal_batch, validated_at", [(2, []), (4, [5])])
def test_the_stop_runs_no_validation_that_was_not_due(tmp_path, cfg, signal_batch, validated_at):
    # Validation every 5 steps: a stop after step 3 skips it (Lightning would validate on should_stop),
    # a stop after step 5 keeps the one due there.
    module = ValidatedModule()
    stop, trainer, saved = fit(tmp_path, cfg, signal_batch=signal_batch, module=module, val_check_interval=5,
                               check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0)
    assert stop.stopped_at == signal_batch + 1 and module.validated_at == validated_at
