"""The released-model configs compose and have the released parameter counts (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd3train.config.typed import ConfigError
from sd3train.model.mmdit import MMDiT
from tests.support.config import compose_config

# (config, depth, qk_norm, dual-attention layers, pos_embed_max_size, parameters, position-table entries).
# Parameters equal diffusers' SD3Transformer2DModel built from each released transformer/config.json;
# the fixed sin-cos table is a buffer, but the released files store it: SD3.5-Medium's 2.24B + 0.23B
# table is the "2.5B" of its model card, SD3.5-Large's 8.06B + 0.09B its "8.1B".
RELEASED = [
    ("sd3_medium", 24, None, [], 192, 2_028_328_000, 192 * 192 * 1536),
    ("sd35_medium", 24, "rms", list(range(13)), 384, 2_243_171_520, 384 * 384 * 1536),
    ("sd35_large", 38, "rms", [], 192, 8_056_627_520, 192 * 192 * 2432),
]


def compose_model(tmp_path: Path, *overrides: str):
    return compose_config(f"text.t5_tokenizer={tmp_path}", *overrides).model


def meta_model(model_cfg) -> MMDiT:
    with torch.device("meta"):  # shapes only: an 8B model costs no memory
        return MMDiT.from_config(model_cfg)


@pytest.mark.parametrize("name,depth,qk_norm,dual,max_size,parameters,table", RELEASED)
def test_released_config_composes_with_the_released_architecture_and_size(
    tmp_path, name, depth, qk_norm, dual, max_size, parameters, table
):
    cfg = compose_model(tmp_path, f"model={name}")
    assert (cfg.depth, cfg.qk_norm, cfg.dual_attention_layers, cfg.pos_embed_max_size) == (depth, qk_norm, dual, max_size)
    assert (cfg.patch_size, cfg.in_channels, cfg.context_dim, cfg.pooled_dim) == (2, 16, 4096, 2048)
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert (model.hidden_size, model.num_heads) == (64 * depth, depth)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.pos_embed.numel() == table


def test_only_sd35_medium_random_crops_positions_and_none_checkpoints_by_default(tmp_path):
    crops = {name: compose_model(tmp_path, f"model={name}").pos_embed_random_crop for name, *_ in RELEASED}
    assert crops == {"sd3_medium": False, "sd35_medium": True, "sd35_large": False}
    assert compose_model(tmp_path, "model=sd35_large").activation_checkpointing == "none"


def test_generic_mmdit_config_takes_its_width_and_heads_from_depth(tmp_path):
    cfg = compose_model(tmp_path, "model=mmdit", "model.depth=16", "model.activation_checkpointing=true")
    model = meta_model(cfg)
    assert (model.depth, model.hidden_size, model.num_heads) == (16, 1024, 16)
    assert model.activation_checkpointing


def test_generic_mmdit_config_requires_a_depth(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.depth: required value is missing"):
        compose_model(tmp_path, "model=mmdit")


@pytest.mark.parametrize("name,depth,qk_norm,dual,max_size,parameters,table", RELEASED)
def test_parameter_count_equals_diffusers_for_the_released_config(
    name, depth, qk_norm, dual, max_size, parameters, table
):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
            num_attention_heads=depth, joint_attention_dim=4096, caption_projection_dim=64 * depth,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=max_size,
            dual_attention_layers=tuple(dual), qk_norm=None if qk_norm is None else "rms_norm",
        )
    assert sum(p.numel() for p in reference.parameters()) == parameters


@pytest.mark.parametrize("overrides,expected", [
    (["model.pos_embed_crop_region=8"], "model.pos_embed_random_crop is false"),
    (["model.pos_embed_random_crop=true", "model.pos_embed_crop_region=17"], "outside 1..model.pos_embed_max_size=16"),
    (["model.pos_embed_random_crop=true", "model.pos_embed_crop_region=3"], "smaller than the 4-patch grid"),
])
def test_impossible_crop_region_is_reported(overrides, expected):
    with pytest.raises(ConfigError, match="model.pos_embed_crop_region") as error:
        compose_config("experiment=tiny_cpu", *overrides)
    assert expected in str(error.value)
