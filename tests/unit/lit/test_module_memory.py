"""What the training module keeps on the training device: with the precompute cache no text encoder
and no VAE encoder (previews still encode prompts, on the CPU), and frozen parts in half precision
under a half-precision run."""

from __future__ import annotations

import torch

from sd3train.lit.module import SD3LitModule
from tests.support.config import tiny_config


def test_training_on_the_cache_keeps_no_encoder_in_the_module(small_shapes, tmp_path):
    cfg = tiny_config(small_shapes, tmp_path, "model.depth=1")
    cfg.data.cached = True  # as data=cached sets it (a cache folder is not needed to build the module)
    module = SD3LitModule(cfg)
    names = [name for name, _ in module.named_parameters()]
    assert not [name for name in names if name.startswith(("text.", "vae.encoder.", "vae.quant_conv."))]
    assert any(name.startswith("vae.decoder.") for name in names)  # previews decode on the device
    context, pooled = module.text.encode(["a red circle on a white background"])  # built now, on the CPU
    assert context.device.type == "cpu" and context.shape == (1, 32, 128) and pooled.shape == (1, 96)
    online = SD3LitModule(tiny_config(small_shapes, tmp_path, "model.depth=1"))
    assert any(name.startswith("text.") for name, _ in online.named_parameters())  # the control


def test_frozen_parts_follow_a_bf16_precision(small_shapes, tmp_path):
    half = SD3LitModule(tiny_config(small_shapes, tmp_path, "model.depth=1", "trainer.precision=bf16-mixed"))
    assert {p.dtype for p in half.text.parameters()} == {p.dtype for p in half.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.mmdit.parameters()} == {torch.float32}  # trained weights stay fp32 (mixed)
    full = SD3LitModule(tiny_config(small_shapes, tmp_path, "model.depth=1"))  # tiny_cpu trains in 32-true
    assert {p.dtype for p in full.text.parameters()} == {torch.float32}
