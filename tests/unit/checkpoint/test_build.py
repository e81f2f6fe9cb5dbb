"""Meta-device construction: loading adopts the checkpoint's tensors instead of copying them."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sd3train.checkpoint.build import assign_weights, on_meta
from sd3train.checkpoint.errors import CheckpointError
from sd3train.model.mmdit import MMDiT


def tiny_mmdit():
    return MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=16,
                 pos_embed_max_size=8, sample_size=8)


def test_model_is_built_without_storage_and_adopts_the_loaded_tensors():
    state = {key: torch.randn(value.shape) for key, value in tiny_mmdit().state_dict().items()}
    model = on_meta(tiny_mmdit)
    assert all(tensor.is_meta for tensor in model.state_dict().values())
    assign_weights(model, state, "test", "MM-DiT")
    # The very same memory: a large checkpoint is held once, not twice.
    assert all(value.data_ptr() == state[key].data_ptr() for key, value in model.state_dict().items())
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_non_persistent_clip_position_ids_are_rebuilt():
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=32, max_position_embeddings=16)
    reference = CLIPTextModelWithProjection(config).eval()
    model = assign_weights(on_meta(lambda: CLIPTextModelWithProjection(config)), reference.state_dict(), "t", "CLIP")
    assert torch.equal(model.text_model.embeddings.position_ids, torch.arange(16)[None])
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).text_embeds, reference(ids).text_embeds)


def test_shape_mismatch_is_refused_before_anything_is_assigned():
    state = dict(tiny_mmdit().state_dict())
    state["context_embedder.weight"] = torch.zeros(64, 33)
    message = r"'context_embedder.weight' has shape \(64, 33\), the model expects \(64, 32\)"
    with pytest.raises(CheckpointError, match=message):
        assign_weights(on_meta(tiny_mmdit), state, "test", "MM-DiT")
