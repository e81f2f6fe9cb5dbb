"""Train an SD3-style model: compose the Hydra config, validate it, build, fit.

    sd3train-train experiment=tiny_cpu                      # the embedded CPU default
    sd3train-train experiment=tiny_cpu trainer.max_steps=20 model.depth=2 data.batch_size=4
    python -m sd3train.train --cfg job experiment=tiny_cpu   # print the composed config

Everything is checked before a model is built; a bad override exits with status 2 and a list of
every problem.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sd3train.config.schema import TrainConfig
from sd3train.config.overrides import normalise_overrides
from sd3train.config.typed import ConfigError, to_plain
from sd3train.config.validate import load_config

CONFIG_EXIT_CODE = 2
# An absolute path: Hydra resolves a relative one against the package when run as a console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def run_dir_of(cfg: TrainConfig) -> Path:
    """runs/<experiment>/<run name>: no timestamp, so a requeued job finds its checkpoints."""
    return Path(cfg.paths.runs_dir) / cfg.experiment_name / cfg.run_name


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> str | None:
    if cfg.trainer.resume == "never":
        return None
    if cfg.trainer.resume != "auto":
        return cfg.trainer.resume
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def fit(cfg: TrainConfig, extra_callbacks: tuple = ()) -> None:
    """Train as `cfg` says; `extra_callbacks` (Lightning callbacks) join the built-in ones."""
    os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
    # Heavy imports only after the config is known to be good.
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sd3train.data.datamodule import ShardDataModule
    from sd3train.lit.callbacks import DataMetrics, PreviewAndEvaluate, StepProgressBar
    from sd3train.lit.loggers import build_loggers
    from sd3train.lit.module import SD3LitModule
    from sd3train.lit.strategy import build_strategy

    # The frozen VAE and text encoders stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    # Shards are checked before the models are built: a wrong path fails in seconds.
    data = ShardDataModule(cfg.data, seed=cfg.trainer.seed)
    data.setup()
    module = SD3LitModule(cfg)
    trainer_cfg = cfg.trainer
    callbacks = [
        DataMetrics(trainer_cfg.log_every_n_steps),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
            every_n_train_steps=trainer_cfg.checkpoint_every_n_steps, save_top_k=-1, save_last=True,
        ),
        PreviewAndEvaluate(
            run_dir, cfg.eval.prompts, cfg.eval.seed, cfg.eval.sample_every_n_steps, cfg.eval.num_colour_prompts
        ),
    ]
    if trainer_cfg.progress_bar:
        callbacks.append(StepProgressBar(refresh_rate=max(1, trainer_cfg.log_every_n_steps // 2)))
    callbacks.extend(extra_callbacks)
    has_val = cfg.data.val_shards is not None and cfg.data.val_batches > 0
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
        gradient_clip_val=cfg.optim.grad_clip,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir),
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume_checkpoint(cfg, run_dir))


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw)
    except ConfigError as error:
        print(f"sd3train-train: {error}", file=sys.stderr)
        sys.exit(CONFIG_EXIT_CODE)
    fit(cfg)


def main() -> None:
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
