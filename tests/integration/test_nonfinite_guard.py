"""A NaN loss at a chosen step (the NanLossAt fault) is skipped without touching the weights or
the EMA; K in a row stop the run with the documented exit status and no new checkpoint. Under DDP
and FSDP2 alike."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from sd3train.model.sharding import local_tensor
from sd3train.runtime.exit_codes import NONFINITE_EXIT_CODE
from sd3train.train import run_to_end
from tests.support.config import tiny_config
from tests.support.faults import NanLossAt


class RecordWeights(L.Callback):
    """Weights and EMA as each step starts, i.e. as the previous step left them."""

    def __init__(self):
        self.before: dict[int, tuple[dict, dict]] = {}

    @staticmethod
    def _copy(model) -> dict:
        # Whole tensors under FSDP2 too (one rank here: its shard is the whole tensor).
        return {name: local_tensor(value.detach()).clone() for name, value in model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step + 1] = (self._copy(pl_module.mmdit), self._copy(pl_module.ema.shadow))


def _config(small_shapes, runs_dir, *overrides):
    return tiny_config(
        small_shapes, runs_dir, "model.depth=1", "data.batch_size=4", "data.cache_latents=false",
        "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false", "data.val_shards=null", *overrides,
    )


def _same(first: dict, second: dict) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_nan_step_changes_neither_weights_nor_ema(small_shapes, tmp_path, strategy):
    recorder = RecordWeights()
    cfg = _config(small_shapes, tmp_path, "trainer.max_steps=5", f"strategy={strategy}")
    from sd3train.train import fit, run_dir_of

    fit(cfg, extra_callbacks=(NanLossAt({3}), recorder))
    weights_after = {step - 1: state for step, state in recorder.before.items()}  # state after step s
    assert _same(weights_after[3][0], weights_after[2][0]) and _same(weights_after[3][1], weights_after[2][1])
    assert not _same(weights_after[2][0], weights_after[1][0])  # control: normal steps move the weights
    assert not _same(weights_after[4][0], weights_after[3][0])
    run_dir = run_dir_of(cfg)
    with open(run_dir / "metrics.csv") as handle:
        counts = [float(row["train/nonfinite_steps"]) for row in csv.DictReader(handle) if row.get("train/nonfinite_steps")]
    assert counts[-1] == 1.0
    steps = sorted(int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("step-*"))
    assert steps == [4, 5]  # keep_checkpoints=2; step 3 (poisoned) was never written


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_k_consecutive_nan_steps_stop_with_the_exit_code_and_no_checkpoint(small_shapes, tmp_path, strategy):
    cfg = _config(small_shapes, tmp_path, "trainer.max_steps=8", "trainer.max_nonfinite_steps=3", f"strategy={strategy}")
    from sd3train.train import run_dir_of

    assert run_to_end(cfg, extra_callbacks=(NanLossAt({3, 4, 5}),))[0] == NONFINITE_EXIT_CODE
    steps = sorted(int(path.name.split("-")[1]) for path in (run_dir_of(cfg) / "checkpoints").glob("step-*"))
    assert steps == [1, 2]
