"""One error type for checkpoints that cannot be read or do not fit, and the strict key/shape check.

Messages name the file (or folder) and the first offending key, not torch's list of hundreds.
"""

from __future__ import annotations

from typing import Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, of an unknown layout, or that does not fit the model."""


def key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'N missing key(s), first K; M unexpected key(s), first K' for whichever list is not empty."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    return "; ".join(parts)


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    key_prefix: str = "",
) -> None:
    """Raise CheckpointError unless `found` has exactly the keys and shapes of `expected`.

    `expected` is typically a model's state dict (meta tensors are fine: only shapes are read).
    `key_prefix`: what the file puts before these keys, so messages name keys as the file has them.
    """
    missing = [key_prefix + key for key in expected if key not in found]
    unexpected = [key_prefix + key for key in found if key not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{what} weights in {source} do not match the model: " + key_mismatch(missing, unexpected))
    for key, tensor in found.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{what} weights in {source}: {key_prefix + key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
