"""Checkpoints: load our models from Stability single files, diffusers folders and our .ckpt; export.

    from sd3train.checkpoint import load_transformer, load_vae, load_text_conditioner
    model = load_transformer(path, dtype=torch.bfloat16)
    vae = load_vae(path)
    text = load_text_conditioner(path)

    from sd3train.checkpoint import mmdit_from_config, text_conditioner_from_config, vae_from_config
    mmdit = mmdit_from_config(cfg.model)     # the training components a config describes, with its weights

Modules: formats (what a path is, prefixes), files (safetensors/.ckpt I/O, atomic writes),
step_dirs (published training checkpoints: layout, marker, resume pick), architecture (configs read
off weights), build (meta-device construction), mmdit_diffusers and vae_ldm (key conversions),
training (our .ckpt), *_loader (the three loaders), encoder_files and tokenizer_files (one text
encoder, the tokenizers), components (models from a config), export_* (writers).
The loaders are imported on first use so that importing a key-conversion module stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_transformer": "sd3train.checkpoint.transformer_loader",
    "load_vae": "sd3train.checkpoint.vae_loader",
    "load_text_conditioner": "sd3train.checkpoint.text_loader",
    "mmdit_from_config": "sd3train.checkpoint.components",
    "vae_from_config": "sd3train.checkpoint.components",
    "text_conditioner_from_config": "sd3train.checkpoint.components",
    "CheckpointError": "sd3train.checkpoint.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
