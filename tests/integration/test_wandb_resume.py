"""A resumed run (a new process, as after a requeue) logs to the same W&B run in offline mode, and its
steps carry on from the checkpoint instead of starting again at 0; the throughput metrics (step time,
TFLOP/s, MFU) are in its history beside the loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd3train.lit.loggers import wandb_run_id
from tests.support.wandb_files import history_rows

BIN = Path(sys.executable).parent


def _train(small_shapes: Path, runs_dir: Path, max_steps: int, *extra: str) -> None:
    args = [
        str(BIN / "sd3train-train"), "experiment=tiny_cpu", f"data.shards={small_shapes}/train-{{000000..000003}}.tar",
        "data.val_shards=null", "data.num_workers=0", "model.depth=1", "data.batch_size=4",
        f"trainer.max_steps={max_steps}", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "eval.prompts=[]", "eval.samples_per_caption=0",
        "logger.wandb=true", "logger.wandb_mode=offline", f"paths.runs_dir={runs_dir}",
        "trainer.peak_tflops=0.01",  # a peak for train/mfu on the CPU
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def history_steps(path: Path) -> list[int]:
    return [step for step, _ in history_rows(path)]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # fsdp: 17 s more
def test_resumed_run_has_the_same_wandb_id_and_continues_its_steps(small_shapes, tmp_path, strategy):
    _train(small_shapes, tmp_path, 3, f"strategy={strategy}")
    _train(small_shapes, tmp_path, 6, f"strategy={strategy}")
    run_dir = tmp_path / "tiny_cpu" / "main"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = wandb_run_id(run_dir)
    assert len(runs) == 2, runs
    assert all(run.name.endswith(f"-{run_id}") and (run / f"run-{run_id}.wandb").is_file() for run in runs)
    steps = [history_steps(run / f"run-{run_id}.wandb") for run in runs]
    # W&B's step is the trainer's: the second process carries on after the first (0-based
    # optimizer steps 0..2, then 3..5) instead of starting again at 0.
    assert steps == [[0, 1, 2], [3, 4, 5]]
    # The throughput metrics reach W&B beside the loss at every logging step.
    for run in runs:
        for _, row in history_rows(run / f"run-{run_id}.wandb"):
            assert {"train/loss", "train/step_time_ms", "train/tflops_per_sec", "train/mfu"} <= set(row), sorted(row)
            assert float(row["train/mfu"]) == pytest.approx(float(row["train/tflops_per_sec"]) / 0.01, rel=1e-6)
