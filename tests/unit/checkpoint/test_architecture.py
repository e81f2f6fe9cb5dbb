"""Architectures read off weights and diffusers configs equal the ones the weights were built with."""

import dataclasses

import pytest
import torch

from sd3train.checkpoint.architecture import (
    clip_config_from_weights,
    mmdit_config_from_diffusers,
    mmdit_config_from_weights,
    sample_size_from_pos_embed,
    t5_config_from_weights,
    vae_config_from_weights,
)
from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.export_diffusers import transformer_config
from sd3train.config.schema import ModelConfig, VAEConfig
from sd3train.model.embeddings import sincos_2d_table
from sd3train.model.mmdit import MMDiT
from sd3train.model.vae import VAE
from tests.support.reference_models import text_config

# Shapes of SD3-Medium, SD3.5-Large and SD3.5-Medium (MMDiT-X) at head dim 64, built on meta.
CONFIGS = [
    ModelConfig(depth=3, hidden_size=128, num_heads=2, pos_embed_max_size=24, sample_size=32),
    ModelConfig(depth=3, hidden_size=128, num_heads=2, pos_embed_max_size=24, sample_size=32, qk_norm="rms",
                context_dim=64, pooled_dim=32, in_channels=4),
    ModelConfig(depth=4, hidden_size=192, num_heads=3, pos_embed_max_size=48, sample_size=16, qk_norm="rms",
                dual_attention_layers=[0, 1], patch_size=1, out_channels=8),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["sd3-medium", "sd3.5-large", "sd3.5-medium"])
def test_mmdit_config_from_weights_and_through_diffusers_config(config):
    model = MMDiT.from_config(config)  # real tensors: the position table's spacing is read
    inferred = mmdit_config_from_weights(model.state_dict(), "test")
    assert inferred == dataclasses.replace(config, out_channels=config.out_channels or config.in_channels)
    assert mmdit_config_from_diffusers(transformer_config(inferred), "test") == inferred


# SD3-Medium / SD3.5-Large, SD3.5-Medium (at width 64: the spacing does not depend on it), tiny ones.
@pytest.mark.parametrize("hidden, max_size, sample_size, patch", [(64, 192, 128, 2), (64, 384, 128, 2),
                                                                  (64, 16, 16, 2), (128, 16, 4, 2)])
def test_sample_size_is_read_off_the_position_table(hidden, max_size, sample_size, patch):
    table = sincos_2d_table(hidden, max_size, base_size=sample_size // patch).unsqueeze(0)
    assert sample_size_from_pos_embed(table, patch) == sample_size
    assert sample_size_from_pos_embed(table.bfloat16(), patch) == sample_size  # bf16 exports too
    assert sample_size_from_pos_embed(torch.randn(1, max_size * max_size, hidden), patch) is None


def test_head_count_without_config_assumes_head_dim_64():
    with torch.device("meta"):
        state = MMDiT(depth=2, hidden_size=96, num_heads=3, pos_embed_max_size=8).state_dict()
    with pytest.raises(CheckpointError, match="width 96 is not a multiple of 64"):
        mmdit_config_from_weights(state, "test", sample_size=16)
    assert mmdit_config_from_weights(state, "test", num_heads=3, sample_size=16).num_heads == 3


def test_vae_config_from_weights():
    config = VAEConfig(block_out_channels=[32, 64, 64], layers_per_block=3, latent_channels=8)
    with torch.device("meta"):
        state = VAE.from_config(config).state_dict()
    assert vae_config_from_weights(state, "test") == config
    with pytest.raises(CheckpointError, match="not divisible by 64 norm groups"):
        vae_config_from_weights(state, "test", norm_num_groups=64)


def test_text_encoder_configs_from_weights():
    text = text_conditioner_from_config(text_config("tiny"))
    with pytest.raises(CheckpointError, match="width 32 is not a multiple of 64"):  # heads need a config
        clip_config_from_weights(text.clip_l.state_dict(), "test", "clip_l")
    for name in ("clip_l", "clip_g"):
        expected = getattr(text, name).config
        state = getattr(text, name).state_dict()
        inferred = clip_config_from_weights(state, "test", name, num_heads=expected.num_attention_heads)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                      "max_position_embeddings", "hidden_act", "eos_token_id"):
            assert getattr(inferred, field) == getattr(expected, field), (name, field)
    inferred = t5_config_from_weights(text.t5.state_dict(), "test")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
                  "relative_attention_num_buckets"):
        assert getattr(inferred, field) == getattr(text.t5.config, field), field
