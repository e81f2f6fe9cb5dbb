"""training_step hands the MM-DiT random position-table offsets only when model.pos_embed_random_crop is on."""

from types import SimpleNamespace

import torch

from sd3train.lit.module import SD3LitModule
from tests.support.config import tiny_config


def offsets_seen_by_training_step(tmp_path, random_crop: bool) -> list:
    """The pos_offset the module passes to its MM-DiT in two runs of step 0 (tiny_cpu: 4x4 patch grid, 16x16 table)."""
    cfg = tiny_config(tmp_path / "shapes", tmp_path / "runs", "model.depth=1", "data.cache_latents=false",
                      "ema.enabled=false", f"model.pos_embed_random_crop={str(random_crop).lower()}")
    module = SD3LitModule(cfg)
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    module.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": cfg.optim.lr}])
    forward, seen = module.mmdit.forward, []

    def recording_forward(*args, pos_offset=None, **kwargs):
        seen.append(pos_offset)
        return forward(*args, pos_offset=pos_offset, **kwargs)

    module.mmdit.forward = recording_forward
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"images": images, "captions": ["a red circle", "a blue square", "a green triangle"]}
    for _ in range(2):
        assert torch.isfinite(module.training_step(batch, 0))
    return seen


def test_training_step_passes_no_offset_when_the_option_is_off(tmp_path):
    assert offsets_seen_by_training_step(tmp_path, random_crop=False) == [None, None]


def test_training_step_draws_per_sample_offsets_inside_the_table_from_the_step_generator(tmp_path):
    first, second = offsets_seen_by_training_step(tmp_path, random_crop=True)
    assert first.shape == (3, 2) and first.dtype == torch.int64
    assert first.min() >= 0 and first.max() <= 16 - 4  # a 4x4 crop of the 16x16 table
    assert torch.equal(first, second)  # the same step draws the same offsets (resumable)
