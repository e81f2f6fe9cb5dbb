"""Probes the multi-process tests add to a real training run by dotted path
(`'trainer.callbacks=[tests.support.probes.SaveWeightsAtStart]'`); the product has no setting for them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

LOADED_WEIGHTS = "weights-at-start.pt"


class SaveWeightsAtStart(L.Callback):
    """At the start of training (after any checkpoint was restored), rank 0 writes the MM-DiT and
    EMA weights as whole tensors to `<run dir>/weights-at-start.pt`; gathered from every rank's
    shards under FSDP2 (a collective: every rank takes part)."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            kept = {key: value.clone() for key, value in state.items() if key.startswith(("mmdit.", "ema.shadow."))}
            torch.save(kept, Path(trainer.default_root_dir) / LOADED_WEIGHTS)
