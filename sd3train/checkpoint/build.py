"""Build a model without random weights, then adopt checkpoint tensors as its parameters.

Modules are constructed on the meta device (shapes only, no memory, no init cost) and the
loaded tensors are assigned in place of the meta ones, so an 8B checkpoint costs its own size
once rather than random weights plus a copy.
"""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

from sd3train.checkpoint.errors import CheckpointError, check_state_dict

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def on_meta(factory: Callable[[], ModuleT]) -> ModuleT:
    with torch.device("meta"):
        return factory()


def _restore_derived_buffers(module: nn.Module) -> None:
    """Recreate non-persistent buffers left on meta: they are not in any checkpoint.

    Only transformers' CLIP `position_ids` (arange) has one among our models; anything else left on
    meta is an error rather than silent garbage.
    """
    for name, submodule in module.named_modules():
        for buffer_name, buffer in list(submodule.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if buffer_name == "position_ids":
                positions = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape)
                submodule.register_buffer(buffer_name, positions.clone(), persistent=False)
            else:
                raise CheckpointError(f"buffer {name}.{buffer_name} is not in the checkpoint and cannot be rebuilt")


def assign_weights(
    model: ModuleT, state: Mapping[str, torch.Tensor], source: str, what: str, key_prefix: str = ""
) -> ModuleT:
    """Strictly check `state` against `model` (keys and shapes), adopt its tensors, return it in eval mode.

    `key_prefix`: the prefix the file stores these keys under, for error messages.
    """
    check_state_dict(model.state_dict(), state, source, what, key_prefix)
    model.load_state_dict(state, strict=False, assign=True)
    _restore_derived_buffers(model)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise CheckpointError(f"{what} weights in {source}: nothing loaded for {leftover[0]!r}")
    return model.eval()
