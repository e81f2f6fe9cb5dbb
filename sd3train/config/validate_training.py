"""Cross-field checks of how training runs: strategy (DDP / FSDP2 / ZeRO stages and their options), batch
arithmetic, checkpoint retention, the non-finite guard and the user's callbacks."""

from __future__ import annotations

from sd3train.config.schema import TrainConfig
from sd3train.runtime.dotted import import_object

STRATEGIES = ("ddp", "fsdp", "deepspeed")
FROZEN_DTYPES = ("auto", "fp32", "bf16", "fp16")
BACKENDS = (None, "nccl", "gloo", "mpi")


def strategy_problems(cfg: TrainConfig) -> list[str]:
    strategy, trainer = cfg.strategy, cfg.trainer
    problems: list[str] = []
    if strategy.name not in STRATEGIES:
        problems.append(f"strategy.name: {strategy.name!r} is not one of {', '.join(STRATEGIES)}")
    elif strategy.name in ("ddp", "fsdp"):
        if strategy.zero_stage != 0:
            problems.append(f"strategy.zero_stage: {strategy.zero_stage} needs strategy.name=deepspeed "
                            "(use strategy=zero1|zero2|zero3)")
        for option in ("offload_optimizer", "offload_parameters"):
            if getattr(strategy, option):
                fix = "FSDP2 offloads with strategy.cpu_offload=true" if strategy.name == "fsdp" else "strategy=zero3_offload"
                problems.append(f"strategy.{option}: needs a ZeRO strategy ({fix})")
    else:
        if strategy.zero_stage not in (1, 2, 3):
            problems.append(f"strategy.zero_stage: must be 1, 2 or 3 with deepspeed, got {strategy.zero_stage}")
        if strategy.offload_parameters and strategy.zero_stage != 3:
            problems.append(f"strategy.offload_parameters: only ZeRO stage 3 shards parameters, "
                            f"strategy.zero_stage is {strategy.zero_stage}")
        if trainer.precision.startswith("16") and trainer.accelerator == "cpu":
            problems.append(f"trainer.precision: {trainer.precision} is refused by DeepSpeed on CPU; use bf16-mixed or 32-true")
    if strategy.name != "fsdp":
        for option in ("hybrid", "cpu_offload"):
            if getattr(strategy, option):
                problems.append(f"strategy.{option}: an FSDP2 option; it needs strategy.name=fsdp (strategy=fsdp)")
    else:
        if strategy.hybrid and trainer.num_nodes < 2:
            problems.append(f"strategy.hybrid: replicates across nodes and needs trainer.num_nodes >= 2, got "
                            f"{trainer.num_nodes} (use strategy=fsdp on one node)")
        if strategy.cpu_offload and trainer.accelerator == "cpu":
            problems.append("strategy.cpu_offload: moves GPU memory to the CPU (FSDP2 pins host memory, which "
                            "needs CUDA); this run's trainer.accelerator is cpu")
    if strategy.process_group_backend not in BACKENDS:
        problems.append(f"strategy.process_group_backend: {strategy.process_group_backend!r} is not one of "
                        f"{', '.join(str(b) for b in BACKENDS)}")
    for name in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(strategy, name) < 1:
            problems.append(f"strategy.{name}: must be >= 1, got {getattr(strategy, name)}")
    return problems


def trainer_problems(cfg: TrainConfig) -> list[str]:
    trainer = cfg.trainer
    problems: list[str] = []
    for name in ("accumulate_grad_batches", "devices", "num_nodes", "max_nonfinite_steps"):
        if getattr(trainer, name) < 1:
            problems.append(f"trainer.{name}: must be >= 1, got {getattr(trainer, name)}")
    if trainer.frozen_dtype not in FROZEN_DTYPES:
        problems.append(f"trainer.frozen_dtype: {trainer.frozen_dtype!r} is not one of {', '.join(FROZEN_DTYPES)}")
    if cfg.ema.every_n_steps < 1:
        problems.append(f"ema.every_n_steps: must be >= 1, got {cfg.ema.every_n_steps}")
    if trainer.keep_checkpoints < 2:
        problems.append(f"trainer.keep_checkpoints: must be >= 2 (a crash while writing the newest must leave "
                        f"an older complete one), got {trainer.keep_checkpoints}")
    if trainer.checkpoint_every_n_steps < 1:
        problems.append(f"trainer.checkpoint_every_n_steps: must be >= 1, got {trainer.checkpoint_every_n_steps}")
    if trainer.peak_tflops is not None and not trainer.peak_tflops > 0:
        problems.append(f"trainer.peak_tflops: must be > 0 (or null for the table of known GPUs), got {trainer.peak_tflops}")
    for index, path in enumerate(trainer.callbacks):
        try:
            import_object(path)
        except Exception as error:  # noqa: BLE001  (a user's module may raise anything on import)
            problems.append(f"trainer.callbacks[{index}]: {error}")
    if trainer.global_batch_size is not None:
        world = trainer.devices * trainer.num_nodes
        actual = cfg.data.batch_size * trainer.accumulate_grad_batches * world
        if actual != trainer.global_batch_size:
            problems.append(
                f"trainer.global_batch_size: {trainer.global_batch_size} != data.batch_size {cfg.data.batch_size} x "
                f"trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} x trainer.devices "
                f"{trainer.devices} x trainer.num_nodes {trainer.num_nodes} = {actual}"
            )
    return problems

