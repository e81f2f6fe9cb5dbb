"""The metric suite (eval.suite: FID, KID, CLIP score, compositional) on a module's sampling
weights: every `eval.every_n_steps` in training (`SuiteEvaluation`), and for sd3train-eval
(`evaluate_module`). Both sample the same prompts with the same seeds in the same batches, so they
give the same numbers for the same weights, on any number of ranks.

Each rank samples its share of the prompt batches (sd3train.inference.generate_images); rank 0
gathers the images, measures them (sd3train/eval/suite.py), logs `eval/...` to the loggers and
writes the images it scored to samples/suite-step-N.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger

from sd3train.config.eval_schema import EvalConfig
from sd3train.eval.suite import MetricSuite, SuitePlan, suite_plan
from sd3train.lit.callbacks import renamed_without, without_encoders_sampler
from sd3train.inference import generate_images, write_grid

GRID_COLUMNS = 16


def sample_plan(module, eval_cfg: EvalConfig, plan: SuitePlan, *, rank: int = 0, world_size: int = 1,
                lockstep: bool = False, sampler=None) -> list[np.ndarray] | None:
    """The plan's images from `module`'s sampling weights (EMA when on), gathered on rank 0, with
    `sampler` (default: the run's diffusion.sampler)."""
    cfg = module.cfg
    side = cfg.data.resolution // module.vae.downsample_factor
    return generate_images(module.sampling_model, module.sampling_text, module.vae, plan.prompts, plan.seeds,
                           (cfg.vae.latent_channels, side, side), sampler or cfg.diffusion.sampler, eval_cfg.batch_size,
                           rank=rank, world_size=world_size, lockstep=lockstep)


def write_suite_grid(path: Path, images: list[np.ndarray]) -> Path:
    return write_grid(path, images, min(GRID_COLUMNS, len(images)))


def sharded_weights(trainer) -> bool:
    """ZeRO-3 and FSDP2 gather weights from all ranks in each forward: every rank must sample in step."""
    return bool(getattr(trainer.strategy, "zero_stage_3", False)) or hasattr(trainer.strategy, "fsdp_mesh")


class SuiteEvaluation(L.Callback):
    """eval.suite every eval.every_n_steps optimizer steps (the last step included when it is a
    multiple), logged at the step Lightning logs that step's validation at (step - 1), so the suite's
    rows line up with val/loss in metrics.csv."""

    def __init__(self, eval_cfg: EvalConfig, run_dir: Path):
        self.eval_cfg = eval_cfg
        self.run_dir = run_dir
        self.plan: SuitePlan | None = None
        self.suite: MetricSuite | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.plan = suite_plan(self.eval_cfg)  # every rank: each samples its share of these prompts
        if trainer.is_global_zero:
            self.suite = MetricSuite(self.eval_cfg, str(pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.eval_cfg.every_n_steps or step % self.eval_cfg.every_n_steps:
            return
        started = time.perf_counter()
        images = sample_plan(pl_module, self.eval_cfg, self.plan, rank=trainer.global_rank,
                             world_size=trainer.world_size, lockstep=sharded_weights(trainer))
        removed = tuple(self.eval_cfg.without_encoders)
        fewer = None
        if removed:  # the same prompts and seeds again, the encoders removed (every rank: it gathers)
            fewer = sample_plan(pl_module, self.eval_cfg, self.plan, rank=trainer.global_rank, world_size=trainer.world_size,
                                lockstep=sharded_weights(trainer),
                                sampler=without_encoders_sampler(pl_module.cfg.diffusion.sampler, removed))
        if not trainer.is_global_zero:
            return
        metrics = self.suite.measure(images, self.plan)
        if fewer is not None:
            metrics.update(renamed_without(self.suite.measure(fewer, self.plan), removed))
        grid = write_suite_grid(self.run_dir / "samples" / f"suite-step-{step}.png", images)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)
            if isinstance(logger, WandbLogger):
                logger.log_image(key="eval/samples", images=[str(grid)], step=step - 1)
            logger.save()
        summary = ", ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in metrics.items())
        print(f"step {step}: {summary} ({len(images)} images, {time.perf_counter() - started:.0f} s; {grid})")
