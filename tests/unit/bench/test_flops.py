"""The analytic MM-DiT FLOP count against torch's FlopCounterMode on tiny models."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sd3train.config.schema import ModelConfig
from sd3train.model.embeddings import TIMESTEP_FREQUENCY_DIM
from sd3train.model.flops import mmdit_forward_flops, mmdit_forward_flops_by_part, training_step_flops
from sd3train.model.mmdit import MMDiT

TEXT_TOKENS = 7
BATCH = 2
CONFIGS = {
    "plain": ModelConfig(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                         pos_embed_max_size=16, sample_size=16),
    # SD3.5-Medium-shaped: rms qk norm, MMDiT-X layers 0 and 1, 3 heads, no qkv bias, 16 -> 8 channels.
    "dual_qk_norm": ModelConfig(depth=3, hidden_size=96, num_heads=3, in_channels=16, out_channels=8,
                                context_dim=80, pooled_dim=40, pos_embed_max_size=16, sample_size=16,
                                qk_norm="rms", dual_attention_layers=[0, 1], qkv_bias=False),
    "mlp_ratio_3": ModelConfig(depth=1, hidden_size=64, num_heads=4, in_channels=4, context_dim=32, pooled_dim=16,
                               pos_embed_max_size=16, sample_size=16, mlp_ratio=3.0),
}
LATENT_SIZES = [(16, 16), (12, 20)]  # square and non-square patch grids (8x8, 6x10)


def counted(config: ModelConfig, height: int, width: int, backward: bool) -> int:
    """FlopCounterMode's total for one forward (and backward) with SDPA's math backend, whose bmm's
    torch counts; torch has no formula for the CPU flash kernel and counts it as 0."""
    torch.manual_seed(0)
    model = MMDiT.from_config(config)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, config.in_channels, height, width, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    context = torch.randn(BATCH, TEXT_TOKENS, config.context_dim, generator=generator)
    pooled = torch.randn(BATCH, config.pooled_dim, generator=generator)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(backward), counter:
        velocity = model(latents, t, context, pooled)
        if backward:
            velocity.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("height,width", LATENT_SIZES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_count_equals_flop_counter_mode(name, height, width):
    config = CONFIGS[name]
    assert mmdit_forward_flops(config, BATCH, height, width, TEXT_TOKENS) == counted(config, height, width, False)


@pytest.mark.parametrize("name", ["plain", "dual_qk_norm"])
def test_training_count_is_three_forwards_less_the_input_gradients_nobody_computes(name):
    """Backward = 2x forward, except that the layers reading the inputs (patch conv, the first
    timestep/pooled Linears, the context embedder) compute no input gradient."""
    config, (height, width) = CONFIGS[name], LATENT_SIZES[1]
    hidden, patch = config.hidden_size, config.patch_size
    image_rows = BATCH * (height // patch) * (width // patch)
    unused_input_gradients = 2 * (
        image_rows * config.in_channels * patch * patch * hidden
        + BATCH * (TIMESTEP_FREQUENCY_DIM + config.pooled_dim) * hidden
        + BATCH * TEXT_TOKENS * config.context_dim * hidden
    )
    expected = training_step_flops(config, BATCH, height, width, TEXT_TOKENS) - unused_input_gradients
    assert counted(config, height, width, True) == expected


def test_dual_attention_layer_adds_its_projections_and_image_self_attention():
    base = ModelConfig(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=16)
    dual = ModelConfig(**{**base.__dict__, "dual_attention_layers": [0]})
    image_tokens, hidden = 6 * 10, 64
    plain_parts = mmdit_forward_flops_by_part(base, 1, 12, 20, 5)
    dual_parts = mmdit_forward_flops_by_part(dual, 1, 12, 20, 5)
    assert dual_parts["attention"] - plain_parts["attention"] == 4 * image_tokens**2 * hidden
    assert dual_parts["block_linears"] - plain_parts["block_linears"] == 2 * image_tokens * hidden * 4 * hidden
    assert dual_parts["adaln"] - plain_parts["adaln"] == 2 * hidden * 3 * hidden  # 9 chunks instead of 6


def test_sd3_medium_at_512_counts_two_flops_per_block_weight_and_token_plus_attention():
    """Depth 24, 1024 image + 154 text tokens: 5.41 TFLOP per training sample."""
    config = ModelConfig(depth=24, qk_norm=None)
    parts = mmdit_forward_flops_by_part(config, 1, 64, 64, 154)
    hidden, tokens = 1536, 1024 + 154
    assert parts["attention"] == 24 * 4 * tokens**2 * hidden
    per_stream_weights = 12 * hidden * hidden  # qkv 3, proj 1, MLP 8 (times hidden^2)
    text_saved = 2 * 154 * 9 * hidden * hidden  # the last text stream has only its qkv
    assert parts["block_linears"] == 24 * 2 * tokens * per_stream_weights - text_saved
    assert training_step_flops(config, 1, 64, 64, 154) == 3 * sum(parts.values())


def test_latents_not_divisible_by_the_patch_size_are_refused():
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        mmdit_forward_flops(CONFIGS["plain"], 1, 15, 16, 4)
