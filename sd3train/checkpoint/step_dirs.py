"""Published training checkpoints: the step-directory layout, its marker, which one to resume, publishing.

    runs/<exp>/<run>/checkpoints/
      step-0000100/
        checkpoint.ckpt   what `trainer.save_checkpoint` writes: a file (one process, DDP) or a
                          directory of per-rank shards (DeepSpeed ZeRO)
        config.yaml       the resolved training config
        COMPLETE          JSON (step, world size, strategy, time), written last
      step-0000200/ ...
      last -> step-0000200   a relative symlink to the newest published checkpoint

A checkpoint is written into `.staging-step-NNNNNNN/`, every file fsynced, the marker written last
(`write_marker`), then the staging directory renamed to `step-NNNNNNN/` (`publish`, atomic on
POSIX) and `last` swapped to it (`point_last`). A process killed at any point leaves either a
`.staging-*` directory, which nothing reads and `clean_stale` removes, or a published, complete
checkpoint. Only a directory whose marker `read_marker` accepts counts as complete, for resume
(`latest_complete_checkpoint`, `resolve_resume_path`) and for reading one
(`training_checkpoint_file`: export, sampling); retention (`apply_retention`) keeps the newest
`keep` and never the one `last` points to. Lightning-free: the callback that writes these is
`sd3train.lit.checkpointing.AtomicCheckpoint`.

    ckpt_path = resume_checkpoint(cfg, run_dir, warn=warnings.warn)   # None for a fresh run
    check_resume_world_size(cfg, ckpt_path)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from sd3train.checkpoint.errors import CheckpointError
from sd3train.config.typed import ConfigError
from sd3train.durable import fsync_dir, write_synced

if TYPE_CHECKING:
    from sd3train.config.schema import TrainConfig

CHECKPOINTS_DIR = "checkpoints"  # under the run directory
TRAINING_CHECKPOINT_FILE = "checkpoint.ckpt"
TRAINING_CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "COMPLETE"
LAST_LINK = "last"
STAGING_PREFIX = ".staging-"  # being written
REPLACED_PREFIX = ".replaced-"  # a published step moved aside while the same step is published again
DELETING_PREFIX = ".deleting-"  # pruned: renamed first, so a half-deleted checkpoint is never read
LINK_TEMP_PREFIX = ".last.tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class IncompleteCheckpointError(CheckpointError):
    """A step directory named explicitly that was never published complete."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> Optional[int]:
    """The step a `step-NNNNNNN` directory name stands for; None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_marker(step_dir: Path, *, named_by_step: bool = True) -> Optional[dict]:
    """The COMPLETE marker of a published step directory; None unless the marker parses, the
    checkpoint beside it exists and (`named_by_step`, what resume and retention need) the directory
    is named `step-N` for the marker's own step. A copy under another name passes with
    `named_by_step=False`, which is how checkpoints are read for export and sampling."""
    try:
        marker = json.loads((Path(step_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or type(marker.get("step")) is not int:
        return None
    if named_by_step and marker["step"] != step_of(step_dir):
        return None
    if not (Path(step_dir) / TRAINING_CHECKPOINT_FILE).exists():
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


def training_checkpoint_file(path: Path) -> Path:
    """The Lightning checkpoint that `path` names: a step directory (or the `last` symlink to one)
    gives the `checkpoint.ckpt` inside it, which must carry a marker that parses (under any
    directory name: a copied step directory reads too); any other path is returned as it is. IncompleteCheckpointError for a step directory that was never completed
    (a run stopped while writing it), a staging directory included."""
    return _checkpoint_inside(Path(path), named_by_step=False)


def _checkpoint_inside(path: Path, named_by_step: bool) -> Path:
    inner = path / TRAINING_CHECKPOINT_FILE
    if not path.is_dir() or not inner.exists():
        return path
    if read_marker(path.resolve(), named_by_step=named_by_step) is None:
        raise IncompleteCheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): the run stopped while writing "
            f"it. Use an older step directory, or {inner} itself if you know it is whole."
        )
    return inner


def resolve_resume_path(path: str | Path) -> Path:
    """What `trainer.resume=PATH` names, as a path for `trainer.fit(ckpt_path=...)`: a step
    directory or `last` gives its checkpoint.ckpt (see `training_checkpoint_file`); the checkpoints
    directory gives its newest complete checkpoint; a file (a checkpoint.ckpt, a .ckpt from
    elsewhere) or a DeepSpeed checkpoint directory is taken as it is. IncompleteCheckpointError
    for anything else, a staging directory included."""
    path = Path(path)
    if path.is_dir() and (path / TRAINING_CHECKPOINT_FILE).exists():
        return _checkpoint_inside(path, named_by_step=True)  # resume picks by the directory's step
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


def resume_checkpoint(cfg: TrainConfig, run_dir: Path, warn: Callable[[str], None]) -> str | None:
    """The checkpoint `trainer.fit` resumes from: for `trainer.resume=auto` the newest complete one
    in run_dir/checkpoints (None for a fresh run), for a path the checkpoint it names (a step
    directory, checkpoints/last, a checkpoint.ckpt or another .ckpt). ConfigError for a named step
    directory that was never completed. `warn` reports what the user should know (rank 0's warning)."""
    checkpoint_dir = Path(run_dir) / CHECKPOINTS_DIR
    if cfg.trainer.resume == "never":
        return None
    if cfg.trainer.resume == "auto":
        latest = latest_complete_checkpoint(checkpoint_dir)
        if latest is None and checkpoint_dir.is_dir():
            legacy = sorted(path.name for path in checkpoint_dir.glob("*.ckpt"))
            if legacy:
                warn(f"{checkpoint_dir} holds {', '.join(legacy)} from an older sd3train (no {checkpoint_dir}"
                     "/step-*/COMPLETE): starting afresh; pass trainer.resume=PATH to continue from one")
        return None if latest is None else str(latest)
    try:
        path = resolve_resume_path(cfg.trainer.resume)
    except IncompleteCheckpointError as error:
        raise ConfigError([f"trainer.resume: {error}"]) from error
    named = step_of(path.parent.resolve()) if path.name == TRAINING_CHECKPOINT_FILE else None
    newer = [step for step, _ in complete_checkpoints(checkpoint_dir) if named is not None and step > named]
    if newer:
        warn(f"resuming from step {named} while {checkpoint_dir} holds newer checkpoints "
             f"(steps {newer}); a later trainer.resume=auto picks the newest of all")
    return str(path)


def check_resume_world_size(cfg: TrainConfig, ckpt_path: str | None) -> None:
    """A ZeRO checkpoint holds one optimizer shard per rank: resuming it on another number of ranks
    is refused (ConfigError) with the way out. DDP checkpoints hold everything and may move; FSDP2's
    (DCP) are resharded on load, so they move too, but only between FSDP2 runs."""
    if ckpt_path is None or Path(ckpt_path).name != TRAINING_CHECKPOINT_FILE:
        return
    marker = read_marker(Path(ckpt_path).parent)
    world_size = cfg.trainer.devices * cfg.trainer.num_nodes
    if marker is not None and (marker.get("strategy") == "fsdp") != (cfg.strategy.name == "fsdp"):
        # FSDP2 writes DCP directories that no other strategy reads, nor it theirs.
        step_dir = Path(ckpt_path).parent
        raise ConfigError([
            f"trainer.resume: {step_dir} was written under strategy {marker.get('strategy')}, this run uses "
            f"strategy.name={cfg.strategy.name}; resume it with the strategy that wrote it, or continue from its "
            f"weights: sd3train-export checkpoint={step_dir} format=single_file out=weights.safetensors, then "
            "train with model.weights=weights.safetensors trainer.resume=never"
        ])
    if marker is None or marker.get("world_size", world_size) == world_size:
        return
    if marker.get("strategy") == "deepspeed" or cfg.strategy.name == "deepspeed":
        step_dir = Path(ckpt_path).parent
        raise ConfigError([
            f"trainer.resume: {step_dir} was written by {marker['world_size']} ranks (ZeRO stage "
            f"{marker.get('zero_stage')}), this run has {world_size} (trainer.devices x trainer.num_nodes); its "
            "optimizer state is sharded per rank. Resume with the same number of ranks, or continue from its "
            f"weights without the optimizer state: sd3train-export checkpoint={step_dir} format=single_file "
            "out=weights.safetensors, then train with model.weights=weights.safetensors trainer.resume=never"
        ])


# -- publishing and pruning (rank 0) -----------------------------------------------------------------

def write_marker(staging_dir: Path, marker: dict) -> None:
    """Write the COMPLETE marker (JSON; `step` is the step the directory is published as) into a
    staging directory, fsynced: the last file written before `publish`."""
    write_synced(staging_dir / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    fsync_dir(staging_dir)


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
        fsync_dir(parent)
        shutil.rmtree(aside)
    else:
        os.rename(staging, final)
    fsync_dir(parent)


def point_last(checkpoint_dir: Path, step_dir_name_: str) -> None:
    """Make `checkpoint_dir/last` a relative symlink to `step_dir_name_`, atomically: a temporary
    link renamed over the old one, so `last` always exists once it has existed."""
    checkpoint_dir = Path(checkpoint_dir)
    temporary = checkpoint_dir / f"{LINK_TEMP_PREFIX}{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(step_dir_name_, temporary)
    os.replace(temporary, checkpoint_dir / LAST_LINK)
    fsync_dir(checkpoint_dir)


def _discard(path: Path) -> None:
    """Remove a published directory: renamed out of the `step-*` namespace first, so a crash during
    the removal leaves a `.deleting-*` directory (removed by the next run), never a half checkpoint."""
    doomed = path.parent / f"{DELETING_PREFIX}{path.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    fsync_dir(path.parent)
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
                fsync_dir(checkpoint_dir)
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
        fsync_dir(checkpoint_dir)
    return removed
