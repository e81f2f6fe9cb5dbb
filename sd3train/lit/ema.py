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
        shadow = [p for p in self.shadow.parameters()]
        source = [p.detach().to(s.dtype) for p, s in zip(model.parameters(), shadow)]
        torch._foreach_lerp_(shadow, source, 1.0 - decay)
        self.num_updates += 1
