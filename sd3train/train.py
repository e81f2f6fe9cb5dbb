"""Train an SD3-style model: compose the Hydra config, validate it, build, fit.

    sd3train-train experiment=tiny_cpu                      # the embedded CPU default
    sd3train-train experiment=tiny_cpu trainer.max_steps=20 model.depth=2 data.batch_size=4
    python -m sd3train.train --cfg job experiment=tiny_cpu   # print the composed config

Everything is checked before a model is built; a bad override exits with status 2 and a list of
every problem.
"""

from __future__ import annotations

# First, before the slow imports: SLURM's preemption signal (USR1) kills a process that has no
# handler, and a requeued job can be signalled while it is still starting.
from sd3train.runtime import preemption

preemption.install_handler()

import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sd3train.config.overrides import normalise_overrides  # noqa: E402
from sd3train.config.schema import TrainConfig  # noqa: E402
from sd3train.config.typed import ConfigError, to_plain  # noqa: E402
from sd3train.config.validate import load_config  # noqa: E402
from sd3train.paths import run_dir_of  # noqa: E402,F401 (part of this module's interface)

# Exit statuses (README, "Exit statuses"); NonFiniteError gives 3 (sd3train/lit/nonfinite.py).
CONFIG_EXIT_CODE = 2
OOM_EXIT_CODE = 4
DATA_BUDGET_EXIT_CODE = 5
# Stopped for preemption with a checkpoint, but not requeued (no SLURM, or scontrol refused):
# run the same command again to continue.
PREEMPTED_EXIT_CODE = 6
# An absolute path: Hydra resolves a relative one against the package when run as a console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> str | None:
    """The checkpoint `trainer.fit` resumes from: for `trainer.resume=auto` the newest complete one
    in run_dir/checkpoints (None for a fresh run), for a path the checkpoint it names (a step
    directory, checkpoints/last, a checkpoint.ckpt or another .ckpt). ConfigError for a named step
    directory that was never completed."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    from sd3train.lit.checkpointing import (
        IncompleteCheckpointError,
        complete_checkpoints,
        latest_complete_checkpoint,
        resolve_resume_path,
        step_of,
    )

    checkpoint_dir = run_dir / "checkpoints"
    if cfg.trainer.resume == "never":
        return None
    if cfg.trainer.resume == "auto":
        latest = latest_complete_checkpoint(checkpoint_dir)
        if latest is None and checkpoint_dir.is_dir():
            legacy = sorted(path.name for path in checkpoint_dir.glob("*.ckpt"))
            if legacy:
                rank_zero_warn(f"{checkpoint_dir} holds {', '.join(legacy)} from an older sd3train (no {checkpoint_dir}"
                               "/step-*/COMPLETE): starting afresh; pass trainer.resume=PATH to continue from one")
        return None if latest is None else str(latest)
    try:
        path = resolve_resume_path(cfg.trainer.resume)
    except IncompleteCheckpointError as error:
        raise ConfigError([f"trainer.resume: {error}"]) from error
    named = step_of(path.parent.resolve()) if path.name == "checkpoint.ckpt" else None
    newer = [step for step, _ in complete_checkpoints(checkpoint_dir) if named is not None and step > named]
    if newer:
        rank_zero_warn(f"resuming from step {named} while {checkpoint_dir} holds newer checkpoints "
                       f"(steps {newer}); a later trainer.resume=auto picks the newest of all")
    return str(path)


def check_resume_world_size(cfg: TrainConfig, ckpt_path: str | None) -> None:
    """A ZeRO checkpoint holds one optimizer shard per rank: resuming it on another number of ranks
    is refused (ConfigError) with the way out. DDP checkpoints hold everything and may move."""
    from sd3train.lit.checkpointing import read_marker

    if ckpt_path is None or Path(ckpt_path).name != "checkpoint.ckpt":
        return
    marker = read_marker(Path(ckpt_path).parent)
    world_size = cfg.trainer.devices * cfg.trainer.num_nodes
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


def srun_tasks(world_size: int, environ=os.environ) -> bool:
    """Whether this process is one of the srun tasks that make up the run, so rank, world size and
    master come from SLURM. Lightning's own test (SLURMEnvironment.detect) says no for a job named
    `bash` or `interactive`, and would then start `devices` processes from each task; an srun task
    (SLURM_STEP_ID is set in job steps, not in the batch shell) with one task per rank is taken
    as such whatever the job's name."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if "SLURM_STEP_ID" in environ and environ.get("SLURM_NTASKS", "").isdigit():
        if int(environ["SLURM_NTASKS"]) == world_size:
            return True
    return SLURMEnvironment.detect()


def fit(cfg: TrainConfig, extra_callbacks: tuple = ()) -> int | None:
    """Train as `cfg` says; `extra_callbacks` (Lightning callbacks) join the built-in ones.

    Returns None when training ran to `trainer.max_steps`, or the step it checkpointed and stopped
    at on a preemption signal (sd3train/lit/preemption.py)."""
    os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
    # Heavy imports only after the config is known to be good.
    import lightning as L
    from sd3train.data.datamodule import ShardDataModule
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from sd3train.lit.callbacks import DataMetrics, PreviewAndEvaluate, StepDelay, StepProgressBar
    from sd3train.lit.checkpointing import AtomicCheckpoint
    from sd3train.lit.loggers import build_loggers
    from sd3train.lit.module import SD3LitModule
    from sd3train.lit.preemption import StopOnPreemption
    from sd3train.lit.strategy import build_strategy

    # The frozen VAE and text encoders stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))))
    ckpt_path = resume_checkpoint(cfg, run_dir)  # before anything is built: a bad path fails at once
    check_resume_world_size(cfg, ckpt_path)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    # Shards are checked before the models are built: a wrong path fails in seconds.
    data = ShardDataModule(cfg.data, seed=cfg.trainer.seed)
    data.setup()
    module = SD3LitModule(cfg)
    trainer_cfg = cfg.trainer
    # checkpoints/step-NNNNNNN/ (staged, marker last, renamed into place) and checkpoints/last.
    checkpointer = AtomicCheckpoint(run_dir, cfg, trainer_cfg.checkpoint_every_n_steps, trainer_cfg.keep_checkpoints)
    stop_on_preemption = StopOnPreemption(checkpointer)
    callbacks = [
        DataMetrics(trainer_cfg.log_every_n_steps),
        checkpointer,
        stop_on_preemption,
        PreviewAndEvaluate(
            run_dir, cfg.eval.prompts, cfg.eval.seed, cfg.eval.sample_every_n_steps, cfg.eval.num_colour_prompts
        ),
    ]
    if trainer_cfg.progress_bar:
        callbacks.append(StepProgressBar(refresh_rate=max(1, trainer_cfg.log_every_n_steps // 2)))
    if trainer_cfg.debug_step_delay_s > 0:
        callbacks.append(StepDelay(trainer_cfg.debug_step_delay_s))
    callbacks.extend(extra_callbacks)
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
        gradient_clip_val=cfg.optim.grad_clip,
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
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return stop_on_preemption.stopped_at


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Again here: a sweep job launched by submitit runs this function unpickled, without importing
    # this module (under `python -m sd3train.train` it is pickled by value).
    preemption.install_handler()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raw.run_name = sweep_run_name(raw.run_name, hydra_cfg.job.num, list(hydra_cfg.overrides.task))
    try:
        cfg = load_config(raw)
    except ConfigError as error:
        print(f"sd3train-train: {error}", file=sys.stderr)
        sys.exit(CONFIG_EXIT_CODE)
    status, finished = run_to_end(cfg)
    # In a sweep, returning lets the launcher (submitit) record the job as done: only when training
    # is. A job stopped for preemption exits instead, and the launcher waits for its requeued run.
    if status != 0 or not finished or hydra_cfg.mode != RunMode.MULTIRUN:
        sys.exit(status)


def sweep_run_name(run_name: str, job_number: int, overrides: list[str]) -> str:
    """A sweep job's run name: `<run_name>-<job number>-<digest of its overrides>`. The same for a
    requeued job (so it resumes), another for the same job number of a sweep over other values (so
    it never resumes a run it is not)."""
    import hashlib

    digest = hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{run_name}-{job_number}-{digest}"


def run_guarded(cfg: TrainConfig) -> int:
    """`fit(cfg)`, turning the failures we expect into documented exit statuses (README)."""
    return run_to_end(cfg)[0]


def run_to_end(cfg: TrainConfig) -> tuple[int, bool]:
    """(exit status, whether training reached trainer.max_steps): `run_guarded` that also says
    whether it stopped for preemption."""
    import torch

    from sd3train.data.skips import DataBudgetError
    from sd3train.lit.nonfinite import NONFINITE_EXIT_CODE, NonFiniteError

    try:
        try:
            stopped_at = fit(cfg)
        finally:
            preemption.ignore_from_now()
    except ConfigError as error:  # found once the run directory is known (trainer.resume)
        print(f"sd3train-train: {error}", file=sys.stderr)
        return CONFIG_EXIT_CODE, False
    except NonFiniteError as error:
        print(f"sd3train-train: {error}", file=sys.stderr)
        return NONFINITE_EXIT_CODE, False
    except torch.OutOfMemoryError as error:
        rank = os.environ.get("RANK", "0")
        summary = torch.cuda.memory_summary(abbreviated=True) if torch.cuda.is_available() else "(no CUDA device)"
        print(f"sd3train-train: out of memory on rank {rank}: {str(error).splitlines()[0]}\n{summary}\n"
              "No checkpoint was written for the failed step; lower data.batch_size, turn on "
              "model.activation_checkpointing, or shard more (strategy=zero2|zero3).", file=sys.stderr)
        return OOM_EXIT_CODE, False
    except DataBudgetError as error:
        print(f"sd3train-train: {error}", file=sys.stderr)
        return DATA_BUDGET_EXIT_CODE, False
    if stopped_at is not None:
        return requeue_after_preemption(stopped_at), False
    return 0, True


def _global_rank() -> int:
    """This process's rank once `fit` has returned: from the process group while there is one,
    else (a strategy that destroys it at teardown, CPU DeepSpeed) from the launcher's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def requeue_after_preemption(step: int) -> int:
    """After the stop checkpoint at `step`: close the W&B run, wait for every rank, then rank 0
    requeues the SLURM job (which ends every task). Exit status 0 when requeued, else 6, the same
    on every rank."""
    import torch.distributed as dist

    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()  # flushed now: SLURM's SIGTERM follows the requeue
    except ImportError:
        pass
    except Exception as error:  # noqa: BLE001  (an upload failing must not keep the job from its requeue)
        print(f"sd3train-train: closing the W&B run failed ({type(error).__name__}: {error}); requeueing anyway",
              file=sys.stderr, flush=True)
    # SIGTERM, which the requeue makes SLURM send to every task, is ignored since the stop
    # (StopOnPreemption): each task still says what happened and exits with its status.
    grouped = dist.is_available() and dist.is_initialized()
    if grouped:
        dist.barrier()
    status = 0
    if _global_rank() == 0:
        requeued, message = preemption.requeue()
        if requeued:
            print(f"sd3train-train: stopped for preemption at step {step} (checkpoint saved); {message}", flush=True)
        else:
            print(f"sd3train-train: stopped for preemption at step {step} (checkpoint saved) but {message}; run "
                  "the same command again to continue from it (trainer.resume=auto)", file=sys.stderr, flush=True)
            status = PREEMPTED_EXIT_CODE
    if grouped:
        # The other ranks stay until rank 0 has requeued: under `srun --kill-on-bad-exit` one of
        # them failing on its way out would otherwise kill rank 0 before the requeue.
        answer = [status]
        dist.broadcast_object_list(answer, src=0)
        status = answer[0]
    return status


def main() -> None:
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
