"""W&B keeps every metric when previews and validation fall on the same step: a preview's images go
to the step Lightning logs that step's metrics at (W&B drops anything logged at an earlier step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.wandb_files import history_rows

BIN = Path(sys.executable).parent


def test_validation_and_preview_at_one_step_both_reach_wandb(small_shapes, tmp_path):
    args = [
        str(BIN / "sd3train-train"), "experiment=tiny_cpu", f"data.shards={small_shapes}/train-{{000000..000003}}.tar",
        f"data.val_shards={small_shapes}/val-000000.tar", "data.val_batches=1", "data.num_workers=0",
        "model.depth=1", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
        "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "eval.prompts=[a red circle on a white background]", "eval.sample_every_n_steps=2",
        "eval.samples_per_caption=0", "diffusion.sampler.num_steps=2",
        "logger.wandb=true", "logger.wandb_mode=offline", f"paths.runs_dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Steps must be monotonically increasing" not in result.stdout + result.stderr
    [wandb_file] = (tmp_path / "tiny_cpu" / "main" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history_rows(wandb_file)
    # 0-based W&B steps: the 2nd optimizer step is step 1, the 4th step 3.
    assert {step for step, row in rows if "val/loss" in row} == {1, 3}
    assert {step for step, row in rows if "samples/filenames" in row} == {1, 4}  # mid-run preview, then the end's
