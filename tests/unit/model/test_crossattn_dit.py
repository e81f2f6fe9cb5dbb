"""The architecture study's cross-attention DiT: MMDiT's call, an identity start, text through
cross-attention only, and the parameter count of the MM-DiT it is compared with."""

import pytest
import torch

from sd3train.checkpoint.components import mmdit_from_config
from sd3train.config.typed import ConfigError
from sd3train.model.crossattn_dit import CrossAttentionDiT
from sd3train.model.mmdit import MMDiT
from tests.support.config import compose_config


def tiny(depth: int = 2) -> CrossAttentionDiT:
    return CrossAttentionDiT(depth=depth, hidden_size=64, num_heads=2, patch_size=1, in_channels=4, context_dim=32,
                             pooled_dim=16, pos_embed_max_size=8, sample_size=8, qk_norm="rms")


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 5, 32, generator=generator), torch.randn(batch, 16, generator=generator))


def test_output_shape_and_zero_start():
    model = tiny()
    latents, t, context, pooled = inputs()
    out = model(latents, t, context, pooled)
    assert out.shape == latents.shape and torch.all(out == 0)  # zeroed final layer, as MMDiT


def test_the_image_depends_on_the_text_only_through_cross_attention():
    model = tiny()
    torch.manual_seed(1)
    for parameter in model.parameters():  # leave the identity start
        torch.nn.init.normal_(parameter, std=0.05)
    latents, t, context, pooled = inputs()
    base = model(latents, t, context, pooled)
    other = context.clone()
    other[0] += 1.0
    changed = model(latents, t, other, pooled)
    assert not torch.allclose(changed[0], base[0]) and torch.equal(changed[1], base[1])
    for block in model.blocks:  # without cross-attention the context is never read
        torch.nn.init.zeros_(block.cross_attn.proj.weight)
        torch.nn.init.zeros_(block.cross_attn.proj.bias)
    assert torch.equal(model(latents, t, other, pooled), model(latents, t, context, pooled))


def test_trains_a_step_and_refuses_mmdit_only_options():
    model = tiny()
    latents, t, context, pooled = inputs()
    loss = (model(latents, t, context, pooled) - latents).square().mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="skip_layers"):
        model(latents, t, context, pooled, skip_layers=[0])


def test_the_architecture_study_compares_models_of_about_equal_size():
    counts = {}
    for arm in (["model.architecture=mmdit"], ["model.architecture=crossattn_dit", "model.depth=6"]):
        cfg = compose_config("experiment=shapes_cpu", "model.compile=false", *arm)
        model = mmdit_from_config(cfg.model)
        counts[cfg.model.architecture] = sum(p.numel() for p in model.parameters())
        assert isinstance(model, MMDiT if arm[0].endswith("mmdit") else CrossAttentionDiT)
    assert abs(counts["crossattn_dit"] / counts["mmdit"] - 1) < 0.02, counts


def test_validation_names_what_the_baseline_cannot_do():
    with pytest.raises(ConfigError) as error:
        compose_config("experiment=shapes_cpu", "model.architecture=crossattn_dit", "diffusion.sampler.skip_layers=[1]",
                       "diffusion.sampler.skip_layer_scale=2.0")
    message = str(error.value)
    assert "model.compile: not available with model.architecture=crossattn_dit" in message
    assert "diffusion.sampler.skip_layers: not available" in message
    with pytest.raises(ConfigError, match="model.architecture: 'unet' is not one of mmdit, crossattn_dit"):
        compose_config("experiment=tiny_cpu", "model.architecture=unet")
