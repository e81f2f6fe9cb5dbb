"""OpenCLIP text-tower names <-> transformers CLIP names: exact round trip, strict about keys."""

import re

import pytest
import torch

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.openclip_text import (
    OPENCLIP_NON_TEXT,
    is_openclip_text,
    openclip_from_transformers,
    transformers_from_openclip,
)

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def text_state():
    """The text-tower tensors of a small random open_clip CLIP (width 64, 2 layers, 16 positions)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=24,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=1, layers=2),
    )
    return {key: value for key, value in model.state_dict().items() if not key.startswith(OPENCLIP_NON_TEXT)}


def test_conversion_round_trips_exactly(text_state):
    assert is_openclip_text(text_state)
    converted = transformers_from_openclip(text_state, "f")
    assert converted["text_projection.weight"].shape == (24, 64)  # (P, D): the transpose of x @ P's matrix
    assert len(converted) == 4 + 1 + 2 * 16  # embeddings, final norm, projection, 16 tensors per layer
    back = openclip_from_transformers(converted)
    assert back.keys() == text_state.keys()
    assert all(torch.equal(back[key], text_state[key]) for key in text_state)


def test_qkv_are_split_in_order_into_separate_storage(text_state):
    converted = transformers_from_openclip(text_state, "f")
    stacked = text_state["transformer.resblocks.1.attn.in_proj_weight"]  # (3 D, D)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        part = converted[f"text_model.encoder.layers.1.self_attn.{name}.weight"]
        assert torch.equal(part, stacked[64 * index: 64 * (index + 1)])
        assert part.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()


def test_missing_and_unexpected_keys_are_named_as_the_file_stores_them(text_state):
    state = {key: value for key, value in text_state.items() if key != "transformer.resblocks.1.ln_2.bias"}
    message = re.escape("in f.safetensors: missing key 'text.transformer.resblocks.1.ln_2.bias'")
    with pytest.raises(CheckpointError, match=message):
        transformers_from_openclip(state, "f.safetensors", key_prefix="text.")
    state = {**text_state, "transformer.resblocks.0.ls_1.gamma": torch.ones(64)}  # layer scale: unsupported
    with pytest.raises(CheckpointError, match="1 unexpected key.*'transformer.resblocks.0.ls_1.gamma'"):
        transformers_from_openclip(state, "f.safetensors")


def test_projection_with_bias_is_refused_and_none_is_left_out(text_state):
    projection = text_state["text_projection"]
    with_bias = {key: value for key, value in text_state.items() if key != "text_projection"}
    with_bias.update({"text_projection.weight": projection.T, "text_projection.bias": torch.zeros(24)})
    with pytest.raises(CheckpointError, match="text_projection.bias"):
        transformers_from_openclip(with_bias, "f")
    without = {key: value for key, value in text_state.items() if key != "text_projection"}
    assert "text_projection.weight" not in transformers_from_openclip(without, "f")
