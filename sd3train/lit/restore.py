"""A finished run's module, rebuilt from its training checkpoint (what sampling and evaluation start from).

    module = restore_module(read_training_checkpoint("runs/shapes_cpu/main/checkpoints/last"))
"""

from __future__ import annotations

from sd3train.checkpoint.training import TrainingCheckpoint
from sd3train.lit.module import SD3LitModule


def restore_module(checkpoint: TrainingCheckpoint) -> SD3LitModule:
    """The checkpoint's module with its weights (EMA included), in eval mode, on the CPU. Parts the
    checkpoint left out (frozen encoders, an adapter run's base) come from the files its config names."""
    module = SD3LitModule(checkpoint.config)
    state = {"state_dict": dict(checkpoint.state_dict), **checkpoint.extra}
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.eval()
