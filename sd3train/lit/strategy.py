"""The Lightning strategy a `StrategyConfig` asks for: DDP, FSDP2 (sd3train/lit/fsdp.py), or DeepSpeed
ZeRO stage 1/2/3.

    sd3train-train experiment=tiny_cpu strategy=zero2 trainer.devices=2   # 2 CPU processes, gloo
    sd3train-train experiment=tiny_cpu strategy=zero3 trainer.devices=2
    sd3train-train strategy=zero3_offload trainer.devices=8               # GPUs: optimizer and params in CPU memory

Lightning launches the other processes itself (`trainer.devices` > 1 re-runs the command once per
extra rank). Gradient clipping (`optim.grad_clip`) and accumulation (`trainer.accumulate_grad_batches`)
reach the DeepSpeed config through the Trainer's arguments, as Lightning passes them.
`trainer.precision=bf16-mixed` becomes DeepSpeed's torch autocast (fp32 weights, bf16 compute, as
under DDP), `bf16-true` DeepSpeed's bf16 mode. The client optimizer from `configure_optimizers`
(torch AdamW) is used as it is, so no fused or CPU Adam kernel is compiled, with offload too.

Lightning's `DeepSpeedStrategy` refuses CPUs; without a GPU (or with `trainer.accelerator=cpu`)
`CPUDeepSpeedStrategy` steps around the three places that assume CUDA (see its docstring). It is
for tests and CPU runs only; GPUs get Lightning's strategy as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from sd3train.config.schema import TrainConfig


def skip_shm_op_build() -> None:
    """Make DeepSpeed's comm backend skip JIT-building its shared-memory op (gloo reduces instead)."""
    # `import deepspeed.comm.torch as m` would bind the `torch` name inside deepspeed.comm instead.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` on CPU processes with gloo (DeepSpeed's CPU accelerator).

    Bypassed, because each assumes CUDA devices:
    1. `setup_environment`'s check that the accelerator is CUDA;
    2. `setup_distributed`'s device-index validation (a CPU device has no index);
    3. `deepspeed.initialize(args=Namespace(device_rank=root_device.index))`: the index is None on
       CPU and DeepSpeed compares it with 0; the local rank is passed instead.
    DeepSpeed's shared-memory all-reduce op is not built (a ~55 s JIT compile on first start; gloo
    does the reductions), and the process group is destroyed at teardown, without which 2-process
    gloo runs sometimes abort at exit ("terminate called without an active exception").
    `trainer.validate/test/predict` outside `fit` (DeepSpeed's inference engine) are not supported.
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check (1)

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without the device-index validation (2).
        skip_shm_op_build()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # (3)
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def deepspeed_strategy(cfg: TrainConfig, cpu: bool) -> DeepSpeedStrategy:
    """ZeRO as `cfg.strategy` says; `cpu` picks `CPUDeepSpeedStrategy` and gloo."""
    strategy = cfg.strategy
    if cpu:  # before DeepSpeed is first imported; it would pick the CPU accelerator anyway, with a warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = strategy.process_group_backend or ("gloo" if cpu else None)  # None: Lightning picks nccl
    cls = CPUDeepSpeedStrategy if cpu else DeepSpeedStrategy
    built = cls(
        stage=strategy.zero_stage,
        offload_optimizer=strategy.offload_optimizer,
        offload_optimizer_device="cpu",
        offload_parameters=strategy.offload_parameters,
        offload_params_device="cpu",
        reduce_bucket_size=strategy.reduce_bucket_size,
        allgather_bucket_size=strategy.allgather_bucket_size,
        overlap_comm=strategy.overlap_comm,
        contiguous_gradients=strategy.contiguous_gradients,
        # Our torch AdamW is not on DeepSpeed's tested list; without this ZeRO refuses it.
        zero_allow_untested_optimizer=True,
        # Only read for DeepSpeed's throughput log; given, Lightning need not build a loader to guess it.
        logging_batch_size_per_gpu=cfg.data.batch_size,
        process_group_backend=backend,
    )
    if cfg.trainer.precision == "bf16-mixed":
        # Lightning maps bf16-mixed to DeepSpeed's bf16 mode, which casts the whole module (the EMA
        # copy and the frozen encoders too) to bf16 and expects bf16 inputs. torch autocast keeps the
        # weights fp32 and computes in bf16, as bf16-mixed does under DDP. "bf16" being present stops
        # Lightning from adding its own.
        built.config["bf16"] = {"enabled": False}
        built.config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    # ZeRO-Offload refuses a client optimizer other than DeepSpeedCPUAdam (a JIT-compiled kernel)
    # unless told otherwise; torch AdamW steps the CPU-resident fp32 states correctly, only slower.
    built.config["zero_force_ds_cpu_optimizer"] = False
    return built


def build_strategy(cfg: TrainConfig):
    """What `L.Trainer(strategy=...)` gets for `cfg`: "auto", a `DDPStrategy`, an `FSDP2Strategy` (even on
    one rank: the checkpoints are DCP directories either way) or a DeepSpeed strategy."""
    strategy, trainer = cfg.strategy, cfg.trainer
    if strategy.name == "deepspeed":
        cpu = trainer.accelerator == "cpu" or not torch.cuda.is_available()
        return deepspeed_strategy(cfg, cpu)
    if strategy.name == "fsdp":
        from sd3train.lit.fsdp import FSDP2Strategy

        if strategy.cpu_offload and not torch.cuda.is_available():
            raise ValueError("strategy.cpu_offload: moves GPU memory to the CPU and needs CUDA, which this "
                             "machine does not have")

        return FSDP2Strategy(trainer.devices * trainer.num_nodes, trainer.num_nodes, strategy.hybrid,
                             process_group_backend=strategy.process_group_backend)
    if strategy.name != "ddp":
        raise ValueError(f"strategy.name: {strategy.name!r} is not ddp, fsdp or deepspeed")
    if trainer.devices * trainer.num_nodes == 1:
        return "auto"
    # Backend None: Lightning picks by device type (gloo on CPU, nccl on CUDA). The gradients are
    # views into DDP's all-reduce buckets instead of a second fp32 copy (8 GB at SD3-Medium size).
    return DDPStrategy(process_group_backend=strategy.process_group_backend, find_unused_parameters=False,
                       gradient_as_bucket_view=True)
