"""`build_strategy`: what each conf/strategy option becomes, composed through the shipped Hydra config.

No process is started: the DeepSpeed config is read off the strategy object (and, for the values
Lightning fills in from the Trainer, off a Trainer that is built but never fitted).
"""

from __future__ import annotations

import importlib

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from sd3train.lit.fsdp import FSDP2Strategy
from sd3train.lit.strategy import (
    CPUDeepSpeedStrategy,
    build_strategy,
    skip_shm_op_build,
)
from tests.support.config import tiny_config

ZERO_OPTIONS = {  # option: (stage, optimizer states offloaded, parameters offloaded)
    "zero1": (1, False, False),
    "zero2": (2, False, False),
    "zero3": (3, False, False),
    "zero3_offload": (3, True, True),
}


@pytest.fixture
def config(tmp_path):
    return lambda *overrides: tiny_config(tmp_path / "shapes", tmp_path / "runs", *overrides)


def test_ddp_on_one_process_is_lightnings_auto(config):
    assert build_strategy(config("strategy=ddp")) == "auto"


def test_ddp_on_two_devices_is_ddp_with_the_backend_left_to_lightning(config):
    strategy = build_strategy(config("strategy=ddp", "trainer.devices=2"))
    assert type(strategy) is DDPStrategy
    assert strategy._process_group_backend is None  # Lightning: gloo for CPU devices, nccl for CUDA
    # Gradients live in the all-reduce buckets: no second fp32 copy (sd3train/bench/memory.py counts one).
    assert strategy._ddp_kwargs == {"find_unused_parameters": False, "gradient_as_bucket_view": True}
    named = build_strategy(config("strategy=ddp", "trainer.num_nodes=2", "strategy.process_group_backend=gloo"))
    assert named._process_group_backend == "gloo"


def test_fsdp_is_the_fsdp2_strategy_on_one_mesh_dimension_or_hybrid(config):
    for devices in (1, 2):
        strategy = build_strategy(config("strategy=fsdp", f"trainer.devices={devices}"))
        assert type(strategy) is FSDP2Strategy and not strategy.hybrid
        # Every rank in the data-parallel (sharding) dimension, none in tensor parallelism.
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (devices, 1)
        assert strategy._save_distributed_checkpoint  # DCP: resumable at another world size
    hybrid = build_strategy(config("strategy=fsdp_hybrid", "trainer.devices=4", "trainer.num_nodes=2"))
    assert hybrid.hybrid and hybrid.hybrid_nodes == 2 and hybrid._data_parallel_size == 8


@pytest.mark.parametrize("option", sorted(ZERO_OPTIONS))
def test_zero_option_sets_stage_offload_and_buckets(config, option):
    stage, offload_optimizer, offload_parameters = ZERO_OPTIONS[option]
    strategy = build_strategy(config(f"strategy={option}", "trainer.devices=2", "data.batch_size=4"))
    assert type(strategy) is CPUDeepSpeedStrategy  # no GPU here
    assert strategy._process_group_backend == "gloo"
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is offload_optimizer
    assert ("offload_param" in zero) is offload_parameters
    if offload_optimizer:
        assert zero["offload_optimizer"]["device"] == "cpu"
    if offload_parameters:
        assert zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    # The client torch AdamW is used as it is: no FusedAdam / DeepSpeedCPUAdam build, offload included.
    assert "optimizer" not in strategy.config
    assert strategy.config["zero_allow_untested_optimizer"] is True
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False
    assert strategy.config["train_micro_batch_size_per_gpu"] == 4


def test_strategy_options_reach_the_deepspeed_config(config):
    strategy = build_strategy(config(
        "strategy=zero2", "trainer.devices=2", "strategy.reduce_bucket_size=5000", "strategy.allgather_bucket_size=7000",
        "strategy.overlap_comm=false", "strategy.contiguous_gradients=false", "strategy.offload_optimizer=true",
    ))
    zero = strategy.config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (5000, 7000)
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is False
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero


def test_gpu_gets_lightnings_own_deepspeed_strategy(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    strategy = build_strategy(config("strategy=zero3", "trainer.devices=2", "trainer.accelerator=gpu"))
    assert type(strategy) is DeepSpeedStrategy
    assert strategy._process_group_backend is None  # Lightning picks nccl for CUDA devices


def test_cpu_accelerator_on_a_gpu_machine_gets_the_cpu_strategy(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    strategy = build_strategy(config("strategy=zero2", "trainer.devices=2", "trainer.accelerator=cpu"))
    assert type(strategy) is CPUDeepSpeedStrategy and strategy._process_group_backend == "gloo"


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def _formatted_config(strategy, **trainer_args) -> dict:
    """The DeepSpeed config as the strategy completes it at setup, from the Trainer's arguments."""
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    module = _Tiny()
    module.trainer = trainer
    trainer.strategy.connect(module)
    trainer.strategy._format_config()
    return trainer.strategy.config


def test_clipping_accumulation_and_precision_come_from_the_trainer(config):
    cfg = config("strategy=zero2", "trainer.devices=2", "trainer.precision=32-true")
    ds = _formatted_config(build_strategy(cfg), gradient_clip_val=0.5, accumulate_grad_batches=3, precision="32-true")
    assert ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 3
    assert "bf16" not in ds and "fp16" not in ds and "torch_autocast" not in ds


def test_bf16_mixed_is_torch_autocast_with_fp32_weights(config):
    # DeepSpeed's own bf16 mode would cast the whole module, EMA copy and frozen encoders included.
    strategy = build_strategy(config("strategy=zero3", "trainer.devices=2", "trainer.precision=bf16-mixed"))
    ds = _formatted_config(strategy, precision="bf16-mixed")
    assert ds["bf16"] == {"enabled": False}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_bf16_true_is_deepspeeds_bf16(config):
    strategy = build_strategy(config("strategy=zero2", "trainer.devices=2", "trainer.precision=bf16-true"))
    ds = _formatted_config(strategy, precision="bf16-true")
    assert ds["bf16"] == {"enabled": True}
    assert "torch_autocast" not in ds


def test_shm_op_build_is_skipped(monkeypatch):
    comm = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(comm, "build_shm_op", comm.build_shm_op)  # restored after the test
    skip_shm_op_build()
    assert comm.build_shm_op() is None
