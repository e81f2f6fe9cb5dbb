"""Adapters on the MM-DiT (peft): what each target group selects, block selection, that only the
adapter trains, our names for peft's, and merging (every kind) into the base; on the CLIP text
encoders, the attention projections alone."""

from __future__ import annotations

import pytest
import torch

from sd3train.config.adapter_schema import AdapterConfig
from sd3train.model.adapters import (
    ADAPTER_KINDS,
    adapter_state_dict,
    adapter_targets,
    add_adapter,
    apply_text_adapter_config,
    base_state_dict,
    load_adapter_state_dict,
    merged_state_dict,
    our_name,
    set_adapter_training,
    text_adapter_targets,
    weights_digest,
)
from sd3train.model.mmdit import MMDiT
from tests.support.reference_models import perturb, relative_error


def build(dual=()) -> MMDiT:
    torch.manual_seed(0)
    return perturb(MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=24,
                         pos_embed_max_size=8, sample_size=4, patch_size=1, dual_attention_layers=list(dual)))


def inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 4, 4, generator=generator), torch.rand(2, generator=generator),
            torch.randn(2, 6, 32, generator=generator), torch.randn(2, 24, generator=generator))


def test_groups_select_the_documented_layers():
    model = build(dual=[0])
    assert adapter_targets(model, ["attention"]) == [
        "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
        "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
        "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.x_block.attn2.proj",
        "joint_blocks.1.context_block.attn.qkv",  # the last text stream is pre-only
        "joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.x_block.attn.proj"]
    assert adapter_targets(model, ["mlp", "modulation"], blocks=[1]) == [
        "joint_blocks.1.context_block.adaLN_modulation.1", "joint_blocks.1.x_block.mlp.fc1",
        "joint_blocks.1.x_block.mlp.fc2", "joint_blocks.1.x_block.adaLN_modulation.1"]
    assert all(".context_block." in name for name in adapter_targets(model, ["context_stream"]))
    assert adapter_targets(model, [r"joint_blocks\.0\.x_block\.mlp\.fc2"]) == ["joint_blocks.0.x_block.mlp.fc2"]
    with pytest.raises(ValueError, match="'nothing' selects no linear layer"):
        adapter_targets(model, ["nothing"])


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_only_the_adapter_trains_and_merging_gives_the_adapted_model(kind):
    model = build()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    add_adapter(model, kind, adapter_targets(model, ["attention", "mlp"]), rank=4, alpha=8)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(our_name(name) in adapter_state_dict(model) for name in trainable)
    assert base_state_dict(model).keys() == base.keys()
    # A few steps on the adapter alone: the base does not move, the output does.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = model(*inputs())
    for _ in range(3):
        model(*inputs()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after_base = base_state_dict(model)
    assert all(torch.equal(after_base[name], base[name]) for name in base)
    with torch.no_grad():
        adapted = model(*inputs())
    assert relative_error(adapted, before) > 1e-4
    merged = build()
    merged.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        assert relative_error(merged(*inputs()), adapted) < 1e-5


def test_adapter_weights_load_back_by_our_names_and_refuse_what_does_not_fit():
    source, target = build(), build()
    for model in (source, target):
        add_adapter(model, "lora", adapter_targets(model, ["attention"]), rank=4, alpha=4)
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)
    load_adapter_state_dict(target, adapter_state_dict(source))
    with torch.no_grad():
        assert torch.equal(target(*inputs()), source(*inputs()))
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(target, {})


def test_the_base_digest_follows_the_weights():
    state = build().state_dict()
    assert weights_digest(state) == weights_digest({name: value.clone() for name, value in state.items()})
    changed = dict(state, **{"x_embedder.proj.bias": state["x_embedder.proj.bias"] + 1e-3})
    assert weights_digest(changed) != weights_digest(state)


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=16, max_position_embeddings=8)
    return perturb(CLIPTextModelWithProjection(config)).eval()


def test_text_encoders_adapt_their_attention_projections_only():
    encoder = tiny_clip()
    assert text_adapter_targets(encoder) == [f"text_model.encoder.layers.{index}.self_attn.{name}_proj"
                                             for index in (0, 1) for name in ("k", "v", "q", "out")]
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = encoder(tokens).text_embeds
    base = {name: value.clone() for name, value in encoder.state_dict().items()}
    apply_text_adapter_config(encoder, AdapterConfig(kind="lora", rank=4, alpha=8.0, dropout=0.5))
    trained = [our_name(name) for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    assert sorted(trained) == sorted(adapter_state_dict(encoder)) and len(trained) == 2 * 4 * 2
    assert base_state_dict(encoder).keys() == base.keys()
    with torch.no_grad():
        assert torch.equal(encoder(tokens).text_embeds, before)  # B starts at zero
    # Kept in eval mode, the encoder's adapters alone switch their dropout on and off.
    set_adapter_training(encoder, True)
    assert not encoder.training and all(module.training for name, module in encoder.named_modules()
                                        if name.endswith("lora_dropout.default"))
    set_adapter_training(encoder, False)
    assert not any(module.training for module in encoder.modules())
    with pytest.raises(ValueError, match="self_attn"):
        text_adapter_targets(build())
