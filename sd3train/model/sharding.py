"""FSDP2 sharding of the MM-DiT: `fully_shard` on each joint block, then on the whole model.

    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cuda", (world_size,))
    shard_mmdit(model, mesh, param_dtype=torch.bfloat16)            # compute in bf16, reduce in fp32

Each joint block becomes one communication unit: its parameters are all-gathered just before its
forward (and, with `reshard_after_forward`, again before its backward) and its gradients
reduce-scattered right after its backward, overlapping the neighbouring blocks' compute. The
root call takes the remaining parameters (embedders, final layer) as one more unit. A 2-D mesh
(replicate, shard) gives hybrid sharding: shards within a row, replicas across rows.

Apply activation checkpointing, compilation and float8 before this (torchtitan's order): the
sharded module wraps what it is given. Parameters become DTensors holding this rank's shard;
their names are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from sd3train.model.mmdit import MMDiT


def shard_mmdit(model: MMDiT, mesh: DeviceMesh, param_dtype: Optional[torch.dtype] = None,
                reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True,
                cpu_offload: bool = False) -> MMDiT:
    """Shard `model` in place over `mesh` and return it.

    `param_dtype`: the dtype the gathered parameters are cast to for compute (None: as stored, fp32);
    gradients are reduced in `reduce_dtype` and the sharded parameters and optimizer stay fp32.
    """
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    for block in model.joint_blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # The root's parameters are needed again at once by the final layer's backward: keeping them
    # gathered after forward saves one all-gather for little memory.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def shard_module(module: nn.Module, mesh: DeviceMesh, param_dtype: Optional[torch.dtype] = None,
                 reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> nn.Module:
    """Shard `module` in place over `mesh` as one unit (an adapted text encoder: small, run once per
    step), with `shard_mmdit`'s precision and offload policies; returns it."""
    fully_shard(module, mesh=mesh, reshard_after_forward=True,
                mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    return module


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are DTensors (sharded by FSDP2)."""
    return any(hasattr(parameter, "to_local") for parameter in module.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
