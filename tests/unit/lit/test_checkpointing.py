"""Atomic checkpoints: what resume considers complete, what retention keeps, how `last` moves,
and the callback's write order (a real Lightning fit, and a scripted trainer for several ranks)."""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from sd3train.checkpoint import step_dirs
from sd3train.checkpoint.step_dirs import (
    IncompleteCheckpointError,
    apply_retention,
    clean_stale,
    complete_checkpoints,
    last_target,
    latest_complete_checkpoint,
    point_last,
    publish,
    resolve_resume_path,
    resume_checkpoint,
    step_dir_name,
)
from sd3train.config.typed import ConfigError, to_plain
from sd3train.lit.checkpointing import AtomicCheckpoint
from tests.support.config import tiny_config
from tests.support.tiny_lightning import TinyModule


def make_checkpoint(root: Path, step: int, *, marker: object = "ok", checkpoint: bool = True,
                    name: str | None = None) -> Path:
    """A step directory as AtomicCheckpoint publishes it; `marker` None leaves the marker out,
    a str other than "ok" is written verbatim."""
    path = root / (name or step_dir_name(step))
    path.mkdir(parents=True)
    if checkpoint:
        torch.save({"global_step": step, "state_dict": {}}, path / "checkpoint.ckpt")
    (path / "config.yaml").write_text("trainer: {}\n")
    if marker == "ok":
        (path / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1, "strategy": "ddp"}))
    elif marker is not None:
        (path / "COMPLETE").write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return path


def names(pairs) -> list[str]:
    return [path.name for _, path in pairs]


# -- what resume considers ---------------------------------------------------------------------------

def test_latest_complete_checkpoint_skips_staging_unmarked_and_corrupt_and_goes_by_step(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, marker=None)  # killed before the marker (cannot happen after a rename, but)
    make_checkpoint(tmp_path, 30, marker='{"step": 30, "world')  # truncated JSON
    make_checkpoint(tmp_path, 40, marker={"step": 4})  # a marker for another step
    make_checkpoint(tmp_path, 50, marker=["not", "a", "dict"])
    make_checkpoint(tmp_path, 60, checkpoint=False)  # marker but no checkpoint.ckpt
    make_checkpoint(tmp_path, 70, name=".staging-step-0000070")  # fully written, never renamed
    make_checkpoint(tmp_path, 80, name="step-0000080.old")
    (tmp_path / "step-0000090.ckpt").write_bytes(b"legacy")
    os.symlink("step-0000010", tmp_path / "step-0000099")  # a link named like a step is not one
    old = tmp_path / step_dir_name(2)
    os.utime(old, (4e9, 4e9))  # newest by mtime: must not matter

    assert names(complete_checkpoints(tmp_path)) == ["step-0000002", "step-0000010"]
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "step-0000010" / "checkpoint.ckpt"


def test_no_checkpoint_directory_or_only_staging_means_no_resume(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "absent") is None
    make_checkpoint(tmp_path, 4, name=".staging-step-0000004")
    assert latest_complete_checkpoint(tmp_path) is None


def test_explicit_resume_paths_resolve_to_the_checkpoint_file(tmp_path):
    step = make_checkpoint(tmp_path, 4)
    point_last(tmp_path, step.name)
    assert resolve_resume_path(step) == step / "checkpoint.ckpt"
    assert resolve_resume_path(tmp_path / "last") == tmp_path / "last" / "checkpoint.ckpt"
    assert resolve_resume_path(step / "checkpoint.ckpt") == step / "checkpoint.ckpt"
    assert resolve_resume_path(tmp_path) == step / "checkpoint.ckpt"  # the checkpoints directory
    other = tmp_path / "elsewhere.ckpt"
    assert resolve_resume_path(other) == other
    unmarked = make_checkpoint(tmp_path, 6, marker=None)
    with pytest.raises(IncompleteCheckpointError, match="not a complete checkpoint"):
        resolve_resume_path(unmarked)
    staged = make_checkpoint(tmp_path, 8, name=".staging-step-0000008")  # marker written, not yet renamed
    with pytest.raises(IncompleteCheckpointError, match="not a complete checkpoint"):
        resolve_resume_path(staged)
    (tmp_path / ".staging-step-0000010").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="is a directory but no checkpoint"):
        resolve_resume_path(tmp_path / ".staging-step-0000010")
    zero = tmp_path / "zero.ckpt"  # a DeepSpeed checkpoint directory
    zero.mkdir()
    (zero / "latest").write_text("checkpoint")
    assert resolve_resume_path(zero) == zero


def test_resume_checkpoint_auto_never_and_paths(tmp_path):
    def cfg(resume):
        return SimpleNamespace(trainer=SimpleNamespace(resume=resume))

    run = tmp_path / "run"
    assert resume_checkpoint(cfg("auto"), run, warnings.warn) is None  # a fresh run
    checkpoints = run / "checkpoints"
    make_checkpoint(checkpoints, 2)
    make_checkpoint(checkpoints, 4)
    make_checkpoint(checkpoints, 6, name=".staging-step-0000006")
    assert resume_checkpoint(cfg("auto"), run, warnings.warn) == str(checkpoints / "step-0000004" / "checkpoint.ckpt")
    assert resume_checkpoint(cfg("never"), run, warnings.warn) is None
    with pytest.warns(UserWarning, match="newer checkpoints"):
        assert resume_checkpoint(cfg(str(checkpoints / "step-0000002")), run, warnings.warn) == str(
            checkpoints / "step-0000002" / "checkpoint.ckpt")
    make_checkpoint(checkpoints, 8, marker=None)
    with pytest.raises(ConfigError, match="trainer.resume: .*step-0000008 is not a complete checkpoint"):
        resume_checkpoint(cfg(str(checkpoints / "step-0000008")), run, warnings.warn)


def test_legacy_last_ckpt_is_not_resumed_but_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"old layout")
    auto = SimpleNamespace(trainer=SimpleNamespace(resume="auto"))
    with pytest.warns(UserWarning, match="last.ckpt from an older sd3train"):
        assert resume_checkpoint(auto, tmp_path, warnings.warn) is None


# -- retention, publishing, the last link ----------------------------------------------------------

def test_retention_keeps_the_newest_and_what_last_points_to(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 1, marker=None)  # not complete: not retention's to delete
    point_last(tmp_path, "step-0000004")  # e.g. the newest was published by another trajectory
    deleted = apply_retention(tmp_path, keep=2)
    assert [path.name for path in deleted] == ["step-0000002"]
    assert names(complete_checkpoints(tmp_path)) == ["step-0000004", "step-0000006", "step-0000008"]
    assert (tmp_path / "step-0000001").is_dir()
    assert not any(path.name.startswith(".deleting-") for path in tmp_path.iterdir())

    point_last(tmp_path, "step-0000008")
    assert [path.name for path in apply_retention(tmp_path, keep=2)] == ["step-0000004"]
    assert names(complete_checkpoints(tmp_path)) == ["step-0000006", "step-0000008"]
    assert apply_retention(tmp_path, keep=2) == []


def test_retention_never_deletes_the_newest_even_when_last_is_older(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    point_last(tmp_path, "step-0000002")
    apply_retention(tmp_path, keep=1)
    assert names(complete_checkpoints(tmp_path)) == ["step-0000002", "step-0000006"]


def test_last_is_replaced_atomically(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    point_last(tmp_path, "step-0000002")
    assert os.readlink(tmp_path / "last") == "step-0000002"  # relative: the run directory can move
    real_replace = os.replace
    seen = []

    def replace(source, target):
        # At the moment of the swap `last` still points to the old checkpoint, and the new link is
        # complete beside it: the rename is the only step, so `last` is never missing.
        assert os.readlink(tmp_path / "last") == "step-0000002"
        assert os.readlink(source) == "step-0000004"
        seen.append((Path(source).name, Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(step_dirs.os, "replace", replace)
    point_last(tmp_path, "step-0000004")
    assert seen and seen[0][1] == "last" and seen[0][0].startswith(".last.tmp-")
    assert os.readlink(tmp_path / "last") == "step-0000004"
    assert last_target(tmp_path) == tmp_path / "step-0000004"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last", "step-0000002", "step-0000004"]


def test_republishing_a_step_replaces_it(tmp_path):
    old = make_checkpoint(tmp_path, 4)
    staging = make_checkpoint(tmp_path, 4, name=".staging-step-0000004")
    (staging / "new").write_text("x")
    publish(staging, old)
    assert (old / "new").is_file() and not staging.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-0000004"]


def test_stale_leftovers_are_removed_and_a_moved_aside_checkpoint_restored(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, name=".staging-step-0000004")
    make_checkpoint(tmp_path, 6, name=".deleting-step-0000006")
    make_checkpoint(tmp_path, 8, name=".replaced-step-0000008")  # killed between publish's renames
    make_checkpoint(tmp_path, 2, name=".replaced-step-0000002")  # killed after both renames
    os.symlink("step-0000002", tmp_path / ".last.tmp-123")
    removed = clean_stale(tmp_path)
    assert sorted(path.name for path in removed) == [
        ".deleting-step-0000006", ".last.tmp-123", ".replaced-step-0000002", ".staging-step-0000004"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-0000002", "step-0000008"]
    assert names(complete_checkpoints(tmp_path)) == ["step-0000002", "step-0000008"]


# -- the callback in a real Lightning fit ------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    return tiny_config(root, root / "runs", "trainer.keep_checkpoints=3")


def fit_tiny(run_dir: Path, cfg, max_steps: int, every: int, keep: int, module=None, **trainer_args):
    callback = AtomicCheckpoint(run_dir, cfg, every, keep)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run_dir, **trainer_args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module or TinyModule())
    return callback


def test_fit_publishes_step_directories_with_config_and_marker(tmp_path, cfg):
    callback = fit_tiny(tmp_path, cfg, max_steps=7, every=2, keep=2)
    checkpoints = tmp_path / "checkpoints"
    assert [path.name for path in callback.published] == [step_dir_name(s) for s in (2, 4, 6, 7)]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last", "step-0000006", "step-0000007"]
    assert os.readlink(checkpoints / "last") == "step-0000007"
    for step in (6, 7):
        directory = checkpoints / step_dir_name(step)
        marker = json.loads((directory / "COMPLETE").read_text())
        assert marker["step"] == step and marker["world_size"] == 1 and marker["strategy"] == "ddp"
        assert marker["checkpoint"] == "file" and marker["wall_time"] > 0
        assert OmegaConf.to_container(OmegaConf.load(directory / "config.yaml")) == to_plain(cfg)
        saved = torch.load(directory / "checkpoint.ckpt", weights_only=False)
        assert saved["global_step"] == step


def test_gradient_accumulation_saves_each_step_once(tmp_path, cfg):
    callback = fit_tiny(tmp_path, cfg, max_steps=4, every=2, keep=5, accumulate_grad_batches=2)
    assert [path.name for path in callback.published] == ["step-0000002", "step-0000004"]


def test_no_checkpoint_after_a_step_skipped_as_non_finite(tmp_path, cfg):
    with pytest.warns(UserWarning, match="skipped as non-finite") as record:
        callback = fit_tiny(tmp_path, cfg, max_steps=7, every=2, keep=5, module=TinyModule(poisoned={4, 7}))
    skipped = [str(w.message).split(" was")[0] for w in record if "non-finite" in str(w.message)]
    assert skipped == ["step 4", "step 7"]  # the scheduled one, and the final one at the end of training
    assert [path.name for path in callback.published] == ["step-0000002", "step-0000006"]
    assert names(complete_checkpoints(tmp_path / "checkpoints")) == ["step-0000002", "step-0000006"]


def test_a_resumed_fit_continues_from_the_newest_complete_checkpoint(tmp_path, cfg):
    fit_tiny(tmp_path, cfg, max_steps=4, every=2, keep=2)
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 6, name=".staging-step-0000006")  # a crash while writing step 6
    resumed = AtomicCheckpoint(tmp_path, cfg, 2, 2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, callbacks=[resumed],
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        trainer.fit(TinyModule(), ckpt_path=latest_complete_checkpoint(checkpoints))
    assert [path.name for path in resumed.published] == ["step-0000006"]  # step 4 is not written again
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last", "step-0000004", "step-0000006"]


# -- the callback's write order, scripted (directory checkpoints, several ranks) ------------------

class ScriptedTrainer:
    """What AtomicCheckpoint uses of a Trainer, for one rank of several run as threads that meet at
    a real barrier; `save_checkpoint` writes a DeepSpeed-like directory holding this rank's shard."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier):
        self.is_global_zero = rank == 0
        self.rank = rank
        self.world_size = world_size
        self.calls: list[str] = []

        def wait(name):
            self.calls.append(f"barrier {name}")
            barrier.wait(timeout=30)

        self.strategy = SimpleNamespace(barrier=wait, reduce_boolean_decision=lambda decision, all=True: decision)

    def save_checkpoint(self, path, weights_only=None):
        self.calls.append(f"save {Path(path).parent.name}/{Path(path).name}")
        shard = Path(path) / "checkpoint"
        shard.mkdir(parents=True, exist_ok=True)
        (Path(path) / "latest").write_text("checkpoint")
        (shard / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(b"shard")
        self.strategy.barrier("Trainer.save_checkpoint")  # as Lightning's does


def pause_after_the_first(sleep, seconds: float):
    """A `before_publish` hook pausing every checkpoint but the first one its callback writes, as a
    kill test's pause does (the first is published at once, to fall back on)."""
    calls = []

    def pause(step: int, staging_dir: Path) -> None:
        calls.append(step)
        if len(calls) > 1:
            sleep(seconds)

    return pause


def test_directory_checkpoints_are_published_by_rank_zero_between_barriers(tmp_path, cfg):
    sleeps = []
    staging = tmp_path / "checkpoints" / ".staging-step-0000004"

    def sleep(seconds):  # the pause: the checkpoint is written, the marker is not
        sleeps.append(seconds)
        assert (staging / "checkpoint.ckpt" / "latest").is_file() and not (staging / "COMPLETE").exists()

    barrier = threading.Barrier(2)
    ranks = [ScriptedTrainer(rank, 2, barrier) for rank in (0, 1)]
    errors = []

    def run(trainer):
        callback = AtomicCheckpoint(tmp_path, cfg, 2, 2)
        callback.before_publish.append(pause_after_the_first(sleep, 7.5))  # on every rank; rank 0 calls it
        try:
            for step in (2, 4):
                callback.save(trainer, step)
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(trainer,)) for trainer in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sleeps == [7.5]  # rank 0 only, and not for the first checkpoint a process writes
    checkpoints = tmp_path / "checkpoints"
    marker = json.loads((checkpoints / "step-0000004" / "COMPLETE").read_text())
    assert marker["checkpoint"] == "directory" and marker["world_size"] == 2
    shards = sorted(path.name for path in (checkpoints / "step-0000004" / "checkpoint.ckpt" / "checkpoint").iterdir())
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert os.readlink(checkpoints / "last") == "step-0000004"
    expected = ["barrier AtomicCheckpoint.staged", "save .staging-step-0000004/checkpoint.ckpt",
                "barrier Trainer.save_checkpoint", "barrier AtomicCheckpoint.written",
                "barrier AtomicCheckpoint.published"]
    assert ranks[0].calls[5:] == ranks[1].calls[5:] == expected  # every rank saves; same barriers
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last", "step-0000002", "step-0000004"]


def test_keep_below_two_is_refused(tmp_path, cfg):
    with pytest.raises(ValueError, match="keep must be >= 2"):
        AtomicCheckpoint(tmp_path, cfg, every_n_steps=2, keep=1)
