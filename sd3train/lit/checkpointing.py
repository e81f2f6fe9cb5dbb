"""`AtomicCheckpoint`: the Lightning callback that writes checkpoints a crash cannot corrupt.

Each checkpoint is staged, fsynced and published as a step directory with its COMPLETE marker
written last (the layout, the marker and publishing: `sd3train.checkpoint.step_dirs`).
`trainer.save_checkpoint` is collective under DDP and DeepSpeed, so the callback calls it on every
rank; rank 0 alone writes the config and marker, publishes and prunes, between barriers. Nothing is
saved right after a step the non-finite guard skipped.

    checkpointer = AtomicCheckpoint(run_dir, cfg, every_n_steps=500, keep=3)
    checkpointer.before_publish.append(lambda step, staging_dir: check_before_publishing(staging_dir))
"""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from sd3train.checkpoint.step_dirs import (
    CHECKPOINTS_DIR,
    STAGING_PREFIX,
    TRAINING_CHECKPOINT_FILE,
    TRAINING_CONFIG_FILE,
    apply_retention,
    clean_stale,
    last_target,
    point_last,
    publish,
    step_dir_name,
    write_marker,
)
from sd3train.durable import fsync_tree, write_synced


def _config_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    from sd3train.config.typed import to_plain

    return OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)))


class AtomicCheckpoint(Checkpoint):
    """Save `run_dir/checkpoints/step-N/` every `every_n_steps` optimizer steps and at the end of
    training (if the final step was not saved yet), keeping the newest `keep` complete checkpoints.

    `cfg` (the TrainConfig) is written beside each checkpoint as config.yaml. No checkpoint is
    written when the module's `last_step_nonfinite` says the step just taken was skipped as non-finite.

    `before_publish`: callables `(step, staging_dir)` that rank 0 calls once every rank has written
    and flushed the checkpoint, with checkpoint.ckpt and config.yaml in `staging_dir` and no marker
    yet, just before it is published: to check it, or for a test to stop there (the kill test). The
    other ranks wait at a barrier meanwhile, so a slow hook counts against the collective timeout,
    and one that raises fails the run with the checkpoint unpublished (the previous one stays the
    one resume picks).

    A Lightning `Checkpoint`: the Trainer runs it after the other callbacks (so their state in the
    checkpoint is that of the step) and adds no ModelCheckpoint of its own beside it.
    """

    def __init__(self, run_dir: Path, cfg: Any, every_n_steps: int, keep: int):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a crash while writing the newest must leave an older one), got {keep}")
        self.checkpoint_dir = Path(run_dir) / CHECKPOINTS_DIR
        self.cfg = cfg
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.before_publish: list[Callable[[int, Path], None]] = []
        self._last_considered = -1  # the step last saved or deliberately not saved
        self._last_saved = -1
        self.published: list[Path] = []  # what this process published (rank 0), in order

    # Lightning hooks

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for path in clean_stale(self.checkpoint_dir):
                rank_zero_info(f"removed {path} (left by a run that stopped while checkpointing)")

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # A resumed run starts at the step it was restored from: that one is saved already.
        self._last_considered = trainer.global_step if trainer.global_step > 0 else -1
        self._last_saved = self._last_considered

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Per micro-batch under gradient accumulation: the step is considered once.
        if step == 0 or step == self._last_considered or step % self.every_n_steps != 0:
            return
        self.save_step(trainer, pl_module, step)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        step = trainer.global_step
        if step > 0 and step != self._last_considered:
            self.save_step(trainer, pl_module, step)

    # Saving

    def save_step(self, trainer, pl_module, step: int) -> Optional[Path]:
        """Checkpoint `step` (the step just taken) unless it was skipped as non-finite; call on every
        rank. Returns its directory, None when not written. A step considered before is not redone."""
        if step == self._last_considered:  # the same answer on every rank, whatever the filesystem
            return self.checkpoint_dir / step_dir_name(step) if step == self._last_saved else None
        self._last_considered = step
        poisoned = bool(getattr(pl_module, "last_step_nonfinite", False))
        # Every rank must take the same branch: save_checkpoint is collective.
        poisoned = bool(trainer.strategy.reduce_boolean_decision(poisoned, all=False))
        if poisoned:
            rank_zero_warn(f"step {step} was skipped as non-finite: not writing its checkpoint "
                           f"(the newest stays {last_target(self.checkpoint_dir) or 'none'})")
            return None
        return self.save(trainer, step)

    def save(self, trainer: "L.Trainer", step: int) -> Path:
        """Write, publish and prune the checkpoint of `step`; call on every rank. Returns step-N/."""
        strategy = trainer.strategy
        name = step_dir_name(step)
        final = self.checkpoint_dir / name
        staging = self.checkpoint_dir / f"{STAGING_PREFIX}{name}"
        started = time.monotonic()
        if trainer.is_global_zero:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        strategy.barrier("AtomicCheckpoint.staged")
        checkpoint = staging / TRAINING_CHECKPOINT_FILE
        trainer.save_checkpoint(checkpoint, weights_only=False)  # collective; ends in a barrier
        if checkpoint.exists():  # every rank flushes what its node wrote (DeepSpeed: its shards)
            fsync_tree(checkpoint)
        strategy.barrier("AtomicCheckpoint.written")
        if trainer.is_global_zero:
            self._publish(trainer, step, staging, final, checkpoint, time.monotonic() - started)
        strategy.barrier("AtomicCheckpoint.published")
        self._last_saved = step
        return final

    def _publish(self, trainer, step: int, staging: Path, final: Path, checkpoint: Path, seconds: float) -> None:
        if not checkpoint.exists():
            raise RuntimeError(f"trainer.save_checkpoint wrote nothing at {checkpoint}")
        write_synced(staging / TRAINING_CONFIG_FILE, _config_yaml(self.cfg))
        for hook in self.before_publish:
            hook(step, staging)
        strategy_cfg = getattr(self.cfg, "strategy", None)
        marker = {
            "step": step,
            "world_size": trainer.world_size,
            "strategy": getattr(strategy_cfg, "name", type(trainer.strategy).__name__),
            "zero_stage": getattr(strategy_cfg, "zero_stage", 0),
            "checkpoint": "directory" if checkpoint.is_dir() else "file",
            "wall_time": time.time(),
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "write_seconds": round(seconds, 3),
        }
        write_marker(staging, marker)
        publish(staging, final)
        point_last(self.checkpoint_dir, final.name)
        self.published.append(final)
        for path in apply_retention(self.checkpoint_dir, self.keep):
            rank_zero_info(f"removed old checkpoint {path} (trainer.keep_checkpoints={self.keep})")
