"""Gradient clipping inside fused AdamW: the module hands the optimizer the clip factor of the norm
it computed for the guard, and one step equals torch's clip_grad_norm_ followed by a plain AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from sd3train.lit.module import SD3LitModule
from tests.support.config import tiny_config


@pytest.mark.parametrize("grad_clip, clipped", [(1e-3, True), (1e6, False)])
def test_a_step_clips_as_clip_grad_norm_then_adamw(small_shapes, tmp_path, grad_clip, clipped):
    cfg = tiny_config(small_shapes, tmp_path, "model.depth=1", f"optim.grad_clip={grad_clip}", "ema.enabled=false")
    torch.manual_seed(0)
    module = SD3LitModule(cfg)
    reference = copy.deepcopy(module.mmdit)
    optimizer = module.configure_optimizers()["optimizer"]
    lr = optimizer.param_groups[0]["lr"]  # the schedule's first value
    assert lr > 0
    expected = torch.optim.AdamW(reference.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for ours, theirs in zip(module.mmdit.parameters(), reference.parameters()):
        ours.grad = torch.randn(ours.shape, generator=generator)
        theirs.grad = ours.grad.clone()

    module.on_before_optimizer_step(optimizer)
    assert (optimizer.grad_scale > 1) == clipped
    optimizer.step()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
    assert (norm > grad_clip) == clipped
    expected.step()
    for (name, ours), theirs in zip(module.mmdit.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-9, msg=name)  # left clipped


def test_without_clipping_the_optimizer_gets_no_scale(small_shapes, tmp_path):
    cfg = tiny_config(small_shapes, tmp_path, "model.depth=1", "optim.grad_clip=null", "ema.enabled=false")
    module = SD3LitModule(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    for parameter in module.mmdit.parameters():
        parameter.grad = torch.ones_like(parameter)
    module.on_before_optimizer_step(optimizer)
    assert optimizer.grad_scale is None and not bool(optimizer.found_inf)


def test_the_clipped_norm_covers_the_text_encoders_adapters(small_shapes, tmp_path):
    from tests.support.checkpoints import write_training_checkpoint

    (tmp_path / "base").mkdir()
    base = write_training_checkpoint(tmp_path / "base", "model.depth=1")
    cfg = tiny_config(small_shapes, tmp_path, "model.depth=1", f"model.weights={base}", "adapter=lora",
                      "adapter.text_encoders=[clip_l,clip_g]", "optim.grad_clip=1e-3", "ema.enabled=false")
    module = SD3LitModule(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    trained = optimizer.param_groups[0]["params"]
    text = [parameter for parameter in module.text.parameters() if parameter.requires_grad]
    assert text and {id(parameter) for parameter in text} <= {id(parameter) for parameter in trained}
    generator = torch.Generator().manual_seed(1)
    for parameter in trained:
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    module.on_before_optimizer_step(optimizer)
    norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in trained])
    torch.testing.assert_close(optimizer.grad_scale, (norm + 1e-6) / 1e-3)
