"""Helpers shared by tests (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sd3train.config.validate import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(shapes: Path, runs_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose(config_name="config", overrides=[
            "experiment=tiny_cpu",
            f"data.shards='{shapes}/train-{{000000..000003}}.tar'",
            f"data.val_shards='{shapes}/val-000000.tar'",
            f"paths.runs_dir={runs_dir}",
            "data.num_workers=0",
            *overrides,
        ])
    return load_config(raw)


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


def one_epoch_keys(datamodule) -> tuple[list[str], Counter]:
    """Keys of a ShardDataModule's epoch 0 and the skip counts its batches carried (stops at epoch
    1's first batch); the datamodule is torn down after, as Lightning does after fit."""
    keys: list[str] = []
    skipped = Counter()
    try:
        for batch in datamodule.train_dataloader():
            if datamodule.epoch != 0:
                break
            keys += batch["keys"]
            skipped = Counter(datamodule.skipped)
    finally:
        datamodule.teardown("fit")  # the persistent workers stop now
    return keys, skipped
