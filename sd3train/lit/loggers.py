"""CSV and W&B loggers writing into the run directory."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from sd3train.config.schema import TrainConfig
from sd3train.runtime.rng import derive_seed


def wandb_run_id(run_dir: Path) -> str:
    """A W&B id derived from the run directory: every rank, and every requeue, agrees on it."""
    return f"{derive_seed('wandb', run_dir.resolve()):016x}"


def build_loggers(cfg: TrainConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        # name="" and version="" put metrics.csv directly in the run directory.
        loggers.append(CSVLogger(save_dir=run_dir, name="", version=""))
    if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=f"{cfg.experiment_name}/{cfg.run_name}",
                id=wandb_run_id(run_dir),
                resume="allow",
                save_dir=str(run_dir),
                mode=cfg.logger.wandb_mode,
            )
        )
    return loggers
