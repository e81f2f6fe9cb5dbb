"""Checkpoints a crash cannot corrupt: staged, fsynced, published by a rename, marker last.

    runs/<exp>/<run>/checkpoints/
      step-0000100/
        checkpoint.ckpt   what `trainer.save_checkpoint` writes: a file (one process, DDP) or a
                          directory of per-rank shards (DeepSpeed ZeRO)
        config.yaml       the resolved training config
        COMPLETE          JSON (step, world size, strategy, time), written last
      step-0000200/ ...
      last -> step-0000200   a relative symlink to the newest published checkpoint

A checkpoint is written into `.staging-step-NNNNNNN/`, every file and directory fsynced, the
marker written and fsynced last, then the staging directory renamed to `step-NNNNNNN/` (atomic
on POSIX) and the parent directory fsynced. A process killed at any point leaves either a
`.staging-*` directory, which nothing reads and the next run removes, or a published, complete
checkpoint. Resume (`latest_complete_checkpoint`) considers only directories whose marker parses,
picked by step number; retention keeps the newest `keep` (>= 2) complete ones and never the one
`last` points to. Nothing is saved right after a step the non-finite guard skipped.

`trainer.save_checkpoint` is collective under DDP and DeepSpeed, so `AtomicCheckpoint` calls it
on every rank; rank 0 alone writes the config and marker, publishes and prunes, between barriers.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from sd3train.checkpoint.formats import COMPLETE_MARKER, TRAINING_CHECKPOINT_FILE, TRAINING_CONFIG_FILE

LAST_LINK = "last"
STAGING_PREFIX = ".staging-"  # being written
REPLACED_PREFIX = ".replaced-"  # a published step moved aside while the same step is published again
DELETING_PREFIX = ".deleting-"  # pruned: renamed first, so a half-deleted checkpoint is never read
LINK_TEMP_PREFIX = ".last.tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> Optional[int]:
    """The step a `step-NNNNNNN` directory name stands for; None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_marker(step_dir: Path) -> Optional[dict]:
    """The COMPLETE marker of a published step directory; None unless the marker parses, names the
    directory's own step and the checkpoint beside it exists."""
    step = step_of(step_dir)
    if step is None:
        return None
    try:
        marker = json.loads((step_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or type(marker.get("step")) is not int or marker["step"] != step:
        return None
    if not (step_dir / TRAINING_CHECKPOINT_FILE).exists():
        return None
    return marker


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete published checkpoint, oldest step first. Staging and
    other dot-directories, the `last` link, directories without a valid marker are left out."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for entry in checkpoint_dir.iterdir():
        step = step_of(entry)
        if step is not None and entry.is_dir() and not entry.is_symlink() and read_marker(entry) is not None:
            found.append((step, entry))
    return sorted(found)


def latest_complete_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """`step-N/checkpoint.ckpt` of the complete checkpoint with the highest step (what
    `trainer.fit(ckpt_path=...)` takes), or None when there is none."""
    complete = complete_checkpoints(checkpoint_dir)
    return complete[-1][1] / TRAINING_CHECKPOINT_FILE if complete else None


def last_target(checkpoint_dir: Path) -> Optional[Path]:
    """The step directory `last` points to (None if there is no `last` link)."""
    link = Path(checkpoint_dir) / LAST_LINK
    if not link.is_symlink():
        return None
    return Path(checkpoint_dir) / Path(os.readlink(link)).name


class IncompleteCheckpointError(ValueError):
    """An explicitly named step directory that was never published complete."""


def resolve_resume_path(path: str | Path) -> Path:
    """What `trainer.resume=PATH` names, as a path for `trainer.fit(ckpt_path=...)`: a step
    directory or `last` gives its checkpoint.ckpt (and must carry a valid marker); the checkpoints
    directory gives its newest complete checkpoint; a file (a checkpoint.ckpt, a .ckpt from
    elsewhere) or a DeepSpeed checkpoint directory is taken as it is. IncompleteCheckpointError
    for anything else, a staging directory included."""
    path = Path(path)
    if path.is_dir() and (path / TRAINING_CHECKPOINT_FILE).exists():
        if read_marker(path.resolve()) is None:
            raise IncompleteCheckpointError(
                f"{path} is not a complete checkpoint (no valid {COMPLETE_MARKER} marker): the run stopped while "
                "writing it; name an older step directory"
            )
        return path / TRAINING_CHECKPOINT_FILE
    if path.is_dir() and (path / LAST_LINK).is_symlink():  # a checkpoints/ directory
        latest = latest_complete_checkpoint(path)
        if latest is None:
            raise IncompleteCheckpointError(f"{path} holds no complete checkpoint")
        return latest
    if path.is_dir() and not (path / "latest").is_file():  # a DeepSpeed checkpoint directory has `latest`
        raise IncompleteCheckpointError(
            f"{path} is a directory but no checkpoint: neither a step directory with {TRAINING_CHECKPOINT_FILE} "
            f"and {COMPLETE_MARKER}, a checkpoints/ directory, nor a DeepSpeed checkpoint"
        )
    return path


# -- durable writes ---------------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries - renames - durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (or `root` itself if it is a file), deepest first."""
    root = Path(root)
    if not root.is_dir():
        fsync_path(root)
        return
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging: Path, final: Path) -> None:
    """Rename the complete `staging` directory to `final` and make the rename durable. A `final`
    that exists (the same step published again after resuming from an older checkpoint) is moved
    aside first and removed after; a crash in between is repaired by `clean_stale`."""
    parent = final.parent
    if final.exists():
        aside = parent / f"{REPLACED_PREFIX}{final.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
        os.rename(staging, final)
        fsync_path(parent)
        shutil.rmtree(aside)
    else:
        os.rename(staging, final)
    fsync_path(parent)


def point_last(checkpoint_dir: Path, step_dir_name_: str) -> None:
    """Make `checkpoint_dir/last` a relative symlink to `step_dir_name_`, atomically: a temporary
    link renamed over the old one, so `last` always exists once it has existed."""
    checkpoint_dir = Path(checkpoint_dir)
    temporary = checkpoint_dir / f"{LINK_TEMP_PREFIX}{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(step_dir_name_, temporary)
    os.replace(temporary, checkpoint_dir / LAST_LINK)
    fsync_path(checkpoint_dir)


def _discard(path: Path) -> None:
    """Remove a published directory: renamed out of the `step-*` namespace first, so a crash during
    the removal leaves a `.deleting-*` directory (removed by the next run), never a half checkpoint."""
    doomed = path.parent / f"{DELETING_PREFIX}{path.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed)


def apply_retention(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep`, never the one `last` points to;
    returns what was deleted. Directories without a valid marker are not touched."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = complete_checkpoints(checkpoint_dir)
    protected = {path.name for _, path in complete[-keep:]}
    target = last_target(checkpoint_dir)
    if target is not None:
        protected.add(target.name)
    deleted = []
    for _, path in complete[:-keep]:
        if path.name not in protected:
            _discard(path)
            deleted.append(path)
    return deleted


def clean_stale(checkpoint_dir: Path) -> list[Path]:
    """Remove what a killed run left behind: staging directories, half-pruned directories and
    temporary links. A step directory moved aside for a republish whose new copy never arrived is
    moved back. Returns what was removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for entry in sorted(checkpoint_dir.iterdir()):
        name = entry.name
        if name.startswith(REPLACED_PREFIX):
            original = checkpoint_dir / name[len(REPLACED_PREFIX):]
            if not original.exists():  # killed between the two renames of `publish`
                os.rename(entry, original)
                fsync_path(checkpoint_dir)
                continue
        elif name.startswith(LINK_TEMP_PREFIX):
            entry.unlink()
            removed.append(entry)
            continue
        elif not name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    if removed:
        fsync_path(checkpoint_dir)
    return removed


# -- the callback ---------------------------------------------------------------------------------

def _config_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    from sd3train.config.typed import to_plain

    return OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)))


class AtomicCheckpoint(Checkpoint):
    """Save `run_dir/checkpoints/step-N/` every `every_n_steps` optimizer steps and at the end of
    training (if the final step was not saved yet), keeping the newest `keep` complete checkpoints.

    `cfg` (the TrainConfig) is written beside each checkpoint as config.yaml. Its
    `trainer.debug_checkpoint_delay_s` pauses between writing checkpoint.ckpt and publishing it,
    for every checkpoint but the first this process writes: a test kills the run in that pause and
    finds the first one to fall back on. No checkpoint is written when the module's
    `last_step_nonfinite` says the step just taken was skipped as non-finite.

    A Lightning `Checkpoint`: the Trainer runs it after the other callbacks (so their state in the
    checkpoint is that of the step) and adds no ModelCheckpoint of its own beside it.
    """

    def __init__(self, run_dir: Path, cfg: Any, every_n_steps: int, keep: int):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a crash while writing the newest must leave an older one), got {keep}")
        self.checkpoint_dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.delay_s = float(getattr(getattr(cfg, "trainer", None), "debug_checkpoint_delay_s", 0.0) or 0.0)
        self._last_considered = -1  # the step last saved or deliberately not saved
        self._last_saved = -1
        self._written = 0  # checkpoints this process wrote
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
        self._written += 1
        if trainer.is_global_zero and self.delay_s > 0 and self._written > 1:
            rank_zero_info(f"{checkpoint} written; publishing in {self.delay_s:g} s (trainer.debug_checkpoint_delay_s)")
            time.sleep(self.delay_s)
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
        write_synced(staging / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
        fsync_path(staging)
        publish(staging, final)
        point_last(self.checkpoint_dir, final.name)
        self.published.append(final)
        for path in apply_retention(self.checkpoint_dir, self.keep):
            rank_zero_info(f"removed old checkpoint {path} (trainer.keep_checkpoints={self.keep})")
