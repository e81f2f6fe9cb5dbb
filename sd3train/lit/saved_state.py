"""What an `SD3LitModule` checkpoint leaves out, and how a load puts it back.

    prune_saved_state(module, checkpoint)   # on_save_checkpoint: frozen parts from files, adapter bases
    fill_left_out(module, checkpoint)       # on_load_checkpoint: those parts as this run built them

Left out: the VAE and the text encoders when the config loads them from weight files; under adapters,
the MM-DiT's base (it comes from model.weights, identified by its digest) and every frozen weight of
the EMA copies (shared with the trained modules). Text adapters (`text.<name>.*lora*`) are always saved;
their encoder's base follows the text encoders' rule, and when left out is identified by its digest.
"""

from __future__ import annotations

import torch

from sd3train.checkpoint.adapters import BASE_KEY, check_adapter_base
from sd3train.checkpoint.components import weight_sources
from sd3train.checkpoint.text_adapters import (
    RECORD_KEY,
    TEXT_EMA_PREFIX,
    TEXT_PREFIX,
    check_text_adapter_base,
    text_base_record,
)
from sd3train.config.schema import TrainConfig
from sd3train.model.adapters import is_adapter_key
from sd3train.model.text_encoders import ENCODER_NAMES


def frozen_from_files(cfg: TrainConfig) -> tuple[str, ...]:
    """Prefixes of frozen parts that are loaded from weight files, so checkpoints need no copy.

    Randomly initialised encoders (tiny configs) are saved: a checkpoint must not depend on
    the initialisation code staying bit-for-bit the same.
    """
    text_from_files = len(weight_sources(cfg.text)) == len(ENCODER_NAMES)  # else all are saved
    return tuple(prefix for prefix, from_files in (("vae.", cfg.vae.weights is not None),
                                                   (TEXT_PREFIX, text_from_files)) if from_files)


def prune_saved_state(module, checkpoint: dict) -> None:
    """Drop from `checkpoint["state_dict"]` what the run rebuilds from its config, and record the
    adapters' bases."""
    state = checkpoint["state_dict"]
    skipped = frozen_from_files(module.cfg)
    for key in [key for key in state if skipped and key.startswith(skipped) and not is_adapter_key(key)]:
        del state[key]
    if module.base_digest is not None:
        # Adapters: only their weights (trained and averaged); the base comes from model.weights,
        # identified by its digest.
        averaged = ("mmdit.", "ema.shadow.", TEXT_EMA_PREFIX)
        for key in [key for key in state if key.startswith(averaged) and not is_adapter_key(key)]:
            del state[key]
        checkpoint[BASE_KEY] = {"weights": module.cfg.model.weights, "digest": module.base_digest}
        if module.text_digests:
            checkpoint[BASE_KEY][RECORD_KEY] = text_base_record(module.cfg.text, module.text_digests)


def fill_left_out(module, checkpoint: dict) -> None:
    """Check the adapters' bases against the checkpoint's record, and give `checkpoint["state_dict"]`
    the keys it left out, as this run built them (from the weight files and seeds its config names)."""
    state = checkpoint["state_dict"]
    parts = [("vae.", module.vae), (TEXT_PREFIX, module.text)]
    if module.base_digest is not None:
        check_adapter_base(checkpoint, module.base_digest, module.cfg.model.weights)
        parts.append(("mmdit.", module.mmdit))
        parts += [("ema.shadow.", module.ema.shadow)] if module.ema is not None else []
        parts += [(TEXT_EMA_PREFIX, module.text_ema.shadow)] if module.text_ema is not None else []
    # A text adapter whose base the checkpoint does not hold must sit on the base it was trained on.
    unsaved = [name for name in module.text_digests
               if not any(key.startswith(f"{TEXT_PREFIX}{name}.") and not is_adapter_key(key) for key in state)]
    check_text_adapter_base(checkpoint, module.text_digests, unsaved)
    for prefix, part in parts:
        if not isinstance(part, torch.nn.Module):
            continue  # the CPU text encoders of a run on the cache are not part of its state
        for key, value in part.state_dict().items():
            state.setdefault(prefix + key, value)
