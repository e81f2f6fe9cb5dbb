"""Every stateful part of a run comes back from its checkpoint exactly: MM-DiT, EMA, optimizer
moments, LR schedule position, data cursor, non-finite guard counters and the step."""

from __future__ import annotations

import copy

import lightning as L
import torch

from sd3train.train import fit
from tests.support.config import tiny_config
from tests.support.faults import NanLossAt


def _tensors_equal(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(
            _tensors_equal(first[key], second[key]) for key in first
        )
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(_tensors_equal(a, b) for a, b in zip(first, second))
    return first == second


def _snapshot(trainer, module) -> dict:
    """Every stateful part, by name (what the test enumerates), copied: training goes on in place."""
    return copy.deepcopy({
        "mmdit": {k: v.clone() for k, v in module.mmdit.state_dict().items()},
        "ema": {k: v.clone() for k, v in module.ema.shadow.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "lr_schedule": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "data_cursor": trainer.datamodule.state_dict(),
        "nonfinite_guard": module.guard.state_dict(),
        "global_step": trainer.global_step,
    })


class CaptureAtEnd(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.state = _snapshot(trainer, pl_module)


class CaptureAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = _snapshot(trainer, pl_module)


def test_every_stateful_part_round_trips_through_a_checkpoint(small_shapes, tmp_path):
    overrides = ("model.depth=1", "data.batch_size=4", "data.num_workers=2", "data.val_shards=null",
                 "trainer.checkpoint_every_n_steps=4", "trainer.progress_bar=false", "eval.prompts=[]",
                 "eval.samples_per_caption=0", "logger.wandb=false",
                 "optim.schedule=cosine", "optim.warmup_steps=2")
    end = CaptureAtEnd()
    fit(tiny_config(small_shapes, tmp_path, "trainer.max_steps=4", *overrides), extra_callbacks=(NanLossAt({2}), end))
    start = CaptureAtStart()
    # Resumed with room for more steps: on_train_start sees the state restored from step 4.
    fit(tiny_config(small_shapes, tmp_path, "trainer.max_steps=5", *overrides), extra_callbacks=(start,))
    assert end.state["global_step"] == 4 and end.state["nonfinite_guard"] == {"total": 1, "consecutive": 0}
    assert end.state["data_cursor"]["ranks"][0]["batches_consumed"] == 4
    for part in end.state:
        assert _tensors_equal(end.state[part], start.state[part]), part
    from sd3train.lit.loggers import wandb_run_id
    from sd3train.train import run_dir_of

    run_dir = run_dir_of(tiny_config(small_shapes, tmp_path, *overrides))
    saved = torch.load(run_dir / "checkpoints" / "last" / "checkpoint.ckpt", weights_only=False, map_location="cpu")
    assert saved["sd3train_wandb_run_id"] == wandb_run_id(run_dir)
