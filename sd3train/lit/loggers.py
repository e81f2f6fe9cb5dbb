"""CSV and W&B loggers writing into the run directory."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sd3train.config.schema import TrainConfig
from sd3train.runtime.rng import derive_seed


def wandb_run_id(run_dir: Path) -> str:
    """A W&B id derived from the run directory: every rank, and every requeue, agrees on it."""
    return f"{derive_seed('wandb', run_dir.resolve()):016x}"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must append to it."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            # Known columns: new keys then trigger Lightning's header rewrite, which keeps old rows.
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """`metrics.csv` directly in the run directory, kept and appended to across resumes."""

    def __init__(self, run_dir: Path):
        # name="" and version="" put metrics.csv directly in the run directory.
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """W&B with its step set to the optimizer step.

    Lightning's logger lets W&B count its own `_step`, which starts again at 0 in every process:
    a resumed (or requeued) offline run would then write steps that go backwards for the same run
    id, and W&B drops those on sync. With `step=global_step` a resumed run continues the curve.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if step is None:
            super().log_metrics(metrics, step)
            return
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)


def build_loggers(cfg: TrainConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(RunCSVLogger(run_dir))
    if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
        loggers.append(
            RunWandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=f"{cfg.experiment_name}/{cfg.run_name}",
                group=cfg.logger.group,
                id=wandb_run_id(run_dir),
                resume="allow",
                save_dir=str(run_dir),
                mode=cfg.logger.wandb_mode,
            )
        )
    return loggers
