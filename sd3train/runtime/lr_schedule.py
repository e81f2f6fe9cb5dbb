"""Learning-rate multiplier as a pure function of the optimizer step (so a resume needs no state).

Linear warmup from 1/warmup to 1 over `warmup` steps, then one of:
- constant: 1 (SD3's pretraining recipe);
- cosine: half a cosine from 1 down to `min_ratio` at `total` steps;
- linear: a straight line from 1 down to `min_ratio` at `total` steps.
Short runs gain most from the decay: the loss drops once the step size shrinks.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay
