"""The Lightning Trainer a TrainConfig asks for, with sd3train's callbacks, loggers and strategy.

    trainer, stop = build_trainer(cfg, run_dir, extra_callbacks=(my_callback,))
    trainer.fit(module, datamodule=data, ckpt_path=...)
    stop.stopped_at          # the step checkpointed for a preemption stop, else None

Callbacks run in this order: step throughput (MFU), data metrics, the preemption stop, previews
and evaluation, subnormals flushed while a CPU run fits, the progress bar, the dotted paths of `trainer.callbacks`, `extra_callbacks` (what
an in-process caller such as a test adds), and last the atomic checkpoint (Lightning runs every
`Checkpoint` after the other callbacks, so their state in it is that of the step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from sd3train.config.schema import TrainConfig
from sd3train.lit.callbacks import DataMetrics, PreviewAndEvaluate, StepProgressBar
from sd3train.lit.evaluation import SuiteEvaluation
from sd3train.lit.checkpointing import AtomicCheckpoint
from sd3train.lit.class_images import GenerateClassImages
from sd3train.lit.denormals import FlushDenormals
from sd3train.lit.loggers import build_loggers
from sd3train.lit.preemption import StopOnPreemption
from sd3train.lit.strategy import build_strategy
from sd3train.lit.throughput import StepThroughput
from sd3train.runtime.dotted import import_object


def srun_tasks(world_size: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of the srun tasks that make up the run, so rank, world size and
    master come from SLURM. Lightning's own test (SLURMEnvironment.detect) says no for a job named
    `bash` or `interactive`, and would then start `devices` processes from each task; an srun task
    (SLURM_STEP_ID is set in job steps, not in the batch shell) with one task per rank is taken
    as such whatever the job's name."""
    if "SLURM_STEP_ID" in environ and environ.get("SLURM_NTASKS", "").isdigit():
        if int(environ["SLURM_NTASKS"]) == world_size:
            return True
    return SLURMEnvironment.detect()


def user_callbacks(paths: Sequence[str]) -> list[L.Callback]:
    """One callback per dotted path of `trainer.callbacks` (a class or factory, called without arguments)."""
    callbacks = []
    for index, path in enumerate(paths):
        callback = import_object(path)()
        if not isinstance(callback, L.Callback):
            raise TypeError(f"trainer.callbacks[{index}]: {path} gave a {type(callback).__name__}, "
                            "not a Lightning Callback")
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: TrainConfig, run_dir: Path, extra_callbacks: Sequence[L.Callback] = ()
                  ) -> tuple[L.Trainer, StopOnPreemption]:
    """The Trainer for `cfg` writing into `run_dir`, and its preemption stop (for `stopped_at`)."""
    trainer_cfg = cfg.trainer
    # checkpoints/step-NNNNNNN/ (staged, marker last, renamed into place) and checkpoints/last.
    checkpointer = AtomicCheckpoint(run_dir, cfg, trainer_cfg.checkpoint_every_n_steps, trainer_cfg.keep_checkpoints)
    stop_on_preemption = StopOnPreemption(checkpointer)
    callbacks = [
        # First, so a logging step's clock is read before other callbacks' work at that step.
        StepThroughput.from_config(cfg),
        DataMetrics(trainer_cfg.log_every_n_steps),
        checkpointer,
        stop_on_preemption,
        PreviewAndEvaluate(
            run_dir, cfg.eval.prompts, cfg.eval.seed, cfg.eval.sample_every_n_steps, cfg.eval.samples_per_caption,
            tuple(cfg.eval.new_shapes), tuple(cfg.eval.without_encoders),
        ),
    ]
    if cfg.eval.suite and cfg.eval.every_n_steps:  # FID, KID, CLIP score, compositional
        callbacks.append(SuiteEvaluation(cfg.eval, run_dir))
    if cfg.data.class_images is not None:  # prior preservation: class images drawn before training
        callbacks.insert(0, GenerateClassImages(cfg))
    callbacks.append(FlushDenormals())
    if trainer_cfg.progress_bar:
        # Refreshed at logging steps only: reading the loss for it waits for the device.
        callbacks.append(StepProgressBar(refresh_rate=max(1, trainer_cfg.log_every_n_steps)))
    callbacks += user_callbacks(trainer_cfg.callbacks) + list(extra_callbacks)
    has_val = cfg.data.val_shards is not None and cfg.data.val_batches > 0
    world_size = trainer_cfg.devices * trainer_cfg.num_nodes
    trainer = L.Trainer(
        max_steps=trainer_cfg.max_steps,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(cfg),
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        precision=trainer_cfg.precision,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        val_check_interval=min(trainer_cfg.val_every_n_steps, trainer_cfg.max_steps) if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.data.val_batches if has_val else 0,
        num_sanity_val_steps=0,
        # DeepSpeed clips inside its engine; otherwise the module clips with the norm it computes
        # for the non-finite guard anyway (sd3train/lit/module.py), so it is computed once.
        gradient_clip_val=cfg.optim.grad_clip if cfg.strategy.name == "deepspeed" else None,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir),
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        enable_checkpointing=True,  # by AtomicCheckpoint, in place of Lightning's ModelCheckpoint
        default_root_dir=run_dir,
        # Under SLURM, rank and world size come from SLURM's variables; the preemption signal is
        # ours (StopOnPreemption), not Lightning's auto-requeue, which saves a checkpoint that
        # only some ranks agree on and that `trainer.resume=auto` does not pick.
        plugins=[SLURMEnvironment(auto_requeue=False)] if srun_tasks(world_size) else None,
    )
    return trainer, stop_on_preemption
