"""Exponential moving average of a model's weights, kept as a frozen copy of the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAModel(nn.Module):
    """`shadow` tracks `decay`-weighted averages of the source model's parameters.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so a
    short run's average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "EMAModel":
        # The shadow never trains: dropout or checkpointing must not switch on in it.
        return super().train(False)

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        pairs = list(zip(self.shadow.parameters(), model.parameters()))
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
            shadow = [s for s, _ in pairs]
            source = [p.detach() for _, p in pairs]
        torch._foreach_lerp_(shadow, [q.to(s.dtype) for q, s in zip(source, shadow)], 1.0 - decay)
        self.num_updates += 1
