"""Float8 training of the MM-DiT's joint blocks with torchao (`model.float8=tensorwise|rowwise`).

    convert_blocks_to_float8(model, "tensorwise")                 # emulated where no float8 matmul exists

Each joint block's attention and MLP linear layers become torchao `Float8Linear`s: their inputs,
weights and output gradients are cast to float8 with dynamic scales (one per tensor, or one per
row with "rowwise") and multiplied by float8 matmuls; weights stay in their own dtype, so the state
dict and checkpoints are unchanged. The adaLN modulation, the embedders and the final layer keep
their precision (small, and the modulation scales everything downstream). Layers whose sizes
are not multiples of 16 (float8 matmul tiles) stay as they are.

`emulate=None` emulates the float8 matmul in higher precision wherever no GPU with float8 tensor
cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell) is present, so the path runs and is
tested on CPUs; the numerics of the casts are the same. Convert before compiling and sharding
(the compiled graphs trace the float8 casts; FSDP2 shards the converted modules' weights).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from sd3train.config.schema import FLOAT8_RECIPES as RECIPES
from sd3train.model.mmdit import MMDiT


def float8_hardware() -> bool:
    """Whether this process's CUDA device has float8 tensor cores."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _converted(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and "adaLN_modulation" not in fqn
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_blocks_to_float8(model: MMDiT, recipe: str, emulate: Optional[bool] = None) -> MMDiT:
    """Swap the joint blocks' linear layers (but the adaLN modulation) for Float8Linear in place;
    return `model`. `recipe` is one of RECIPES ("none" changes nothing)."""
    if recipe not in RECIPES:
        raise ValueError(f"model.float8: {recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "none":
        return model
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe),
                                 emulate=not float8_hardware() if emulate is None else emulate)
    for block in model.joint_blocks:
        convert_to_float8_training(block, config=config, module_filter_fn=_converted)
    return model


def float8_linears(model: nn.Module) -> int:
    """How many of `model`'s modules are torchao Float8Linear."""
    return sum(type(module).__name__ == "Float8Linear" for module in model.modules())
