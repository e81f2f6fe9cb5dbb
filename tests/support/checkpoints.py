"""A training checkpoint as sd3train-train writes it, without training, for the loader and export tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.config import tiny_config


def write_training_checkpoint(root: Path, *overrides: str) -> Path:
    """A .ckpt as sd3train-train writes it (tiny_cpu experiment, depth 2, sampler shift 2.5) whose
    EMA copy differs from the trained weights. The tiny VAE comes from data/vae_tiny, so the file
    holds no vae.* keys."""
    from sd3train.lit.module import SD3LitModule

    cfg = tiny_config(root / "shapes", root / "runs", "model.depth=2", "diffusion.sampler.shift=2.5", *overrides)
    module = SD3LitModule(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model, scale in ((module.mmdit, 0.05), (module.ema.shadow, 0.02)):
            for _, parameter in sorted(model.named_parameters()):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(checkpoint)  # what Lightning's checkpoint hook does
    path = root / "last.ckpt"
    torch.save(checkpoint, path)
    return path
