"""Exponential moving average of a model's weights, kept as a frozen copy of the model."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from sd3train.model.sharding import local_tensor


class EMAModel(nn.Module):
    """`shadow` tracks `decay`-weighted averages of the source model's parameters.

    The effective decay per step warms up as min(decay, (1 + n) / (10 + n)) over the first n steps
    averaged, so a short run's average is not dominated by the random initialisation. Updated every
    `every_n_steps` optimizer steps with that decay to the power `every_n_steps` (the same horizon
    in steps, warm-up included, for a k-th of the memory traffic). The decay is computed on the device from the update
    count and a skipped step (`applied` False) changes nothing, so an update never reads a value
    back to the host.
    """

    def __init__(self, model: nn.Module, decay: float, every_n_steps: int = 1):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        # What does not train (an adapter run's base) is not averaged: the shadow shares it.
        for shadow, parameter in zip(self.shadow.parameters(), model.parameters()):
            if not parameter.requires_grad:
                shadow.data = parameter.data
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "EMAModel":
        # The shadow never trains: dropout or checkpointing must not switch on in it.
        return super().train(False)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is one the average follows."""
        return step % self.every_n_steps == 0

    def current_decay(self) -> torch.Tensor:
        """The decay of the next update (a float64 tensor on the buffer's device)."""
        n = self.num_updates.double() * self.every_n_steps  # steps averaged so far
        warm = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        return warm**self.every_n_steps

    @torch.no_grad()
    def update(self, model: nn.Module, applied: Optional[torch.Tensor] = None) -> None:
        """Move the average towards `model`'s weights; `applied` (a device bool) False: the optimizer
        skipped this step, so the average and the update count stay as they are."""
        weight = 1.0 - self.current_decay()
        if applied is not None:
            weight = weight * applied.to(weight.device)
        # Only what trains moves (a frozen base under adapters is the same in both).
        pairs = [(s, p) for s, p in zip(self.shadow.parameters(), model.parameters()) if p.requires_grad]
        if pairs and hasattr(pairs[0][0], "ds_tensor"):
            # DeepSpeed ZeRO-3 splits the shadow and the model alike over the ranks: each rank
            # averages its own slice (no communication). Parameters DeepSpeed keeps whole
            # (small ones) hold a full copy as well, which is averaged too.
            shadow = [s.ds_tensor for s, _ in pairs]
            source = [p.ds_tensor for _, p in pairs]
            for s, p in pairs:
                if s.numel() == s.ds_numel and p.numel() == p.ds_numel:
                    shadow.append(s.data)
                    source.append(p.data)
        else:
            # FSDP2 shards the shadow as it shards the model: each rank averages its local shard.
            shadow = [local_tensor(s) for s, _ in pairs]
            source = [local_tensor(p.detach()) for _, p in pairs]
        if shadow:
            # A 0-dim weight per tensor, on its device in its dtype: the Scalar overload would read a
            # tensor weight back to the host.
            weights = {(s.device, s.dtype): weight.to(s.device, s.dtype) for s in shadow}
            torch.ops.aten._foreach_lerp_.List(
                shadow, [q.to(s.dtype) for q, s in zip(source, shadow)], [weights[s.device, s.dtype] for s in shadow]
            )
        self.num_updates += 1 if applied is None else applied.to(self.num_updates.device).long()
