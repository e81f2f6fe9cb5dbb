"""Train an SD3-style model: compose the Hydra config, validate it, build, fit.

    sd3train-train experiment=tiny_cpu                      # the embedded CPU default
    sd3train-train experiment=tiny_cpu trainer.max_steps=20 model.depth=2 data.batch_size=4
    python -m sd3train.train --cfg job experiment=tiny_cpu   # print the composed config

Everything is checked before a model is built; a bad override exits with status 2 and a list of
every problem (all exit statuses: sd3train/runtime/exit_codes.py).
"""

from __future__ import annotations

# First, before the slow imports: SLURM's preemption signal (USR1) kills a process that has no
# handler, and a requeued job can be signalled while it is still starting.
from sd3train.runtime import preemption

preemption.install_handler()

import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sd3train.config.compose import register_schema_defaults  # noqa: E402
from sd3train.config.overrides import normalise_overrides  # noqa: E402
from sd3train.config.schema import TrainConfig  # noqa: E402
from sd3train.config.typed import ConfigError, to_plain  # noqa: E402
from sd3train.config.validate import load_config  # noqa: E402
from sd3train.paths import CONF_DIR, run_dir_of, sweep_run_name  # noqa: E402
from sd3train.runtime.exit_codes import (CONFIG_EXIT_CODE, DATA_BUDGET_EXIT_CODE, FINISHED,  # noqa: E402
                                         NONFINITE_EXIT_CODE, OOM_EXIT_CODE, out_of_memory_report)

register_schema_defaults()  # conf/config.yaml starts from them; Hydra composes before _hydra_main runs


def fit(cfg: TrainConfig, extra_callbacks: tuple = ()) -> int | None:
    """Train as `cfg` says; `extra_callbacks` (Lightning callbacks) join the built-in ones and those
    `trainer.callbacks` names. Returns None when training ran to `trainer.max_steps`, or the step it
    checkpointed and stopped at on a preemption signal (sd3train/lit/preemption.py)."""
    os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
    # Heavy imports only after the config is known to be good.
    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    from sd3train.checkpoint.step_dirs import check_resume_world_size, resume_checkpoint
    from sd3train.data.datamodule import ShardDataModule
    from sd3train.lit.denormals import flush_before_threads_start
    from sd3train.lit.module import SD3LitModule
    from sd3train.lit.trainer import build_trainer

    # The frozen VAE and text encoders stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
    # Before anything is built: a bad path or a checkpoint of another world size fails at once.
    ckpt_path = resume_checkpoint(cfg, run_dir, warn=rank_zero_warn)
    check_resume_world_size(cfg, ckpt_path)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # Shards are checked before the models are built: a wrong path fails in seconds.
    data = ShardDataModule(cfg.data, seed=cfg.trainer.seed)
    data.setup()
    flush_before_threads_start(cfg.trainer.accelerator)  # sd3train/lit/denormals.py
    module = SD3LitModule(cfg)
    data.prepare_batch = module.prepare_batch  # token ids made on the host, moved with the batch
    trainer, stop_on_preemption = build_trainer(cfg, run_dir, extra_callbacks)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:  # Lightning skips the datamodule's teardown when fit raises: stop the loader workers anyway
        data.teardown("fit")
    return stop_on_preemption.stopped_at


def run_to_end(cfg: TrainConfig, extra_callbacks: tuple = ()) -> tuple[int, bool]:
    """(exit status, whether training reached trainer.max_steps): `fit`, with the failures we
    expect turned into their documented exit statuses, and a preemption stop into a requeue."""
    import torch

    from sd3train.data.skips import DataBudgetError
    from sd3train.lit.nonfinite import NonFiniteError
    from sd3train.lit.preemption import requeue_after_preemption

    try:
        try:
            stopped_at = fit(cfg, extra_callbacks)
        finally:
            preemption.ignore_from_now()
    except (ConfigError, NonFiniteError, DataBudgetError) as error:  # ConfigError: found with the run directory
        print(f"sd3train-train: {error}", file=sys.stderr)
        if isinstance(error, ConfigError):
            return CONFIG_EXIT_CODE, False
        return (NONFINITE_EXIT_CODE if isinstance(error, NonFiniteError) else DATA_BUDGET_EXIT_CODE), False
    except torch.OutOfMemoryError as error:
        print(f"sd3train-train: {out_of_memory_report(error)}", file=sys.stderr)
        return OOM_EXIT_CODE, False
    if stopped_at is not None:
        return requeue_after_preemption(stopped_at), False
    return FINISHED, True


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Again here: a sweep job launched by submitit runs this function unpickled, without importing
    # this module (under `python -m sd3train.train` it is pickled by value).
    preemption.install_handler()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and raw.paths.sweep_suffix:
        raw.run_name = sweep_run_name(raw.run_name, hydra_cfg.job.num, list(hydra_cfg.overrides.task))
    try:
        cfg = load_config(raw)
    except ConfigError as error:
        print(f"sd3train-train: {error}", file=sys.stderr)
        sys.exit(CONFIG_EXIT_CODE)
    status, finished = run_to_end(cfg)
    # In a sweep, returning lets the launcher (submitit) record the job as done: only when training
    # is. A job stopped for preemption exits instead, and the launcher waits for its requeued run.
    if status != FINISHED or not finished or hydra_cfg.mode != RunMode.MULTIRUN:
        sys.exit(status)


def main() -> None:
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
