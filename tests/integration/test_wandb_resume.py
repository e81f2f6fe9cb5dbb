"""A resumed run (a new process, as after a requeue) logs to the same W&B run in offline mode, and its
steps carry on from the checkpoint instead of starting again at 0."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from sd3train.lit.loggers import wandb_run_id

BIN = Path(sys.executable).parent


def _train(small_shapes: Path, runs_dir: Path, max_steps: int) -> None:
    args = [
        str(BIN / "sd3train-train"), "experiment=tiny_cpu", f"data.shards={small_shapes}/train-{{000000..000003}}.tar",
        "data.val_shards=null", "data.num_workers=0", "model.depth=1", "data.batch_size=4",
        f"trainer.max_steps={max_steps}", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "eval.prompts=[]", "eval.num_colour_prompts=0",
        "logger.wandb=true", "logger.wandb_mode=offline", f"paths.runs_dir={runs_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of an offline `.wandb` file: a ":W&B" header, then LevelDB-style log blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle and last pieces of a long one
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def history_steps(path: Path) -> list[int]:
    steps = []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.HasField("history"):
            steps.append(record.history.step.num)
    return steps


def test_resumed_run_has_the_same_wandb_id_and_continues_its_steps(small_shapes, tmp_path):
    _train(small_shapes, tmp_path, 3)
    _train(small_shapes, tmp_path, 6)
    run_dir = tmp_path / "tiny_cpu" / "main"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = wandb_run_id(run_dir)
    assert len(runs) == 2, runs
    assert all(run.name.endswith(f"-{run_id}") and (run / f"run-{run_id}.wandb").is_file() for run in runs)
    steps = [history_steps(run / f"run-{run_id}.wandb") for run in runs]
    # W&B's step is the trainer's: the second process carries on after the first (0-based
    # optimizer steps 0..2, then 3..5) instead of starting again at 0.
    assert steps == [[0, 1, 2], [3, 4, 5]]
