"""Checkpoints: load our models from Stability single files, diffusers folders and our .ckpt; export.

    from sd3train.checkpoint import load_transformer, load_vae, load_text_conditioner
    model = load_transformer(path, dtype=torch.bfloat16)
    vae = load_vae(path)
    text = load_text_conditioner(path)

Modules: formats (what a path is, prefixes), files (safetensors/.ckpt I/O, atomic writes),
architecture (configs read off weights), build (meta-device construction), mmdit_diffusers and
vae_ldm (key conversions), training (our .ckpt), *_loader (the three loaders), export_* (writers).
The loaders are imported on first use so that importing a key-conversion module stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_transformer": "sd3train.checkpoint.transformer_loader",
    "load_vae": "sd3train.checkpoint.vae_loader",
    "load_text_conditioner": "sd3train.checkpoint.text_loader",
    "CheckpointError": "sd3train.checkpoint.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
