"""LoRA exports: diffusers loads ours and computes what our adapted MM-DiT computes; the kohya /
ComfyUI layout follows its published naming rule and round-trips; merging gives the same model."""

from __future__ import annotations

import pytest
import torch

from sd3train.checkpoint.lora_formats import (
    lora_from_diffusers,
    lora_from_kohya,
    lora_to_diffusers,
    lora_to_kohya,
)
from sd3train.checkpoint.mmdit_diffusers import diffusers_to_official
from sd3train.model.adapters import (
    add_adapter,
    adapter_state_dict,
    adapter_targets,
    base_state_dict,
    load_adapter_state_dict,
    merged_state_dict,
)
from sd3train.model.mmdit import MMDiT
from tests.support.reference_models import MMDIT_DEPTH as DEPTH
from tests.support.reference_models import MMDIT_VARIANTS as VARIANTS
from tests.support.reference_models import diffusers_transformer, relative_error
from tests.support.reference_models import mmdit_inputs as inputs

RANK, ALPHA = 4, 8.0
TARGETS = ["attention", "mlp", "modulation"]


def our_model(variant: str) -> MMDiT:
    qk_norm, dual = VARIANTS[variant]
    return MMDiT(depth=DEPTH, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                 pos_embed_max_size=16, sample_size=16, qk_norm=qk_norm, dual_attention_layers=dual).eval()


def adapted(variant: str, base: dict | None = None, seed: int = 5) -> MMDiT:
    """Our MM-DiT (with the weights `base`, if given) and a LoRA on every target group, its A and B
    random (B starts at zero)."""
    model = our_model(variant)
    if base is not None:
        model.load_state_dict(base, strict=True)
    add_adapter(model, "lora", adapter_targets(model, TARGETS), rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium"])
def test_diffusers_loads_our_lora_and_computes_our_adapted_output(variant):
    pytest.importorskip("diffusers")
    reference = diffusers_transformer(variant)
    model = adapted(variant, diffusers_to_official(reference.state_dict(), DEPTH))
    latents, t, context, pooled = inputs(8, 8)
    with torch.no_grad():
        before = reference(latents, context, pooled, t * 1000).sample
        ours = model(latents, t, context, pooled)
    qk_norm, dual = VARIANTS[variant]
    reference.load_lora_adapter(lora_to_diffusers(adapter_state_dict(model), ALPHA, RANK, DEPTH, dual),
                                prefix="transformer")
    with torch.no_grad():
        theirs = reference(latents, context, pooled, t * 1000).sample
    assert relative_error(ours, before) > 0.05  # the adapter changes the output
    assert relative_error(theirs, ours) < 1e-5
    # The merged export computes the same.
    merged = our_model(variant)
    merged.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        assert relative_error(merged(latents, t, context, pooled), ours) < 1e-5


def test_the_diffusers_layout_reads_back_exactly():
    model = adapted("sd3.5-medium")
    ours = adapter_state_dict(model)
    dual = VARIANTS["sd3.5-medium"][1]
    back = lora_from_diffusers(lora_to_diffusers(ours, ALPHA, RANK, DEPTH, dual), ALPHA, RANK, DEPTH, dual)
    assert back.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(back[key], ours[key], rtol=1e-6, atol=0)


def published_kohya_names(depth: int, dual_attention_layers: set[int]) -> set[str]:
    """kohya sd-scripts' SD3 LoRA module names, from its rule (`lora_unet_` + the Stability module
    path with dots as underscores), for every adapted linear layer of a `depth`-block MM-DiT."""
    names = set()
    for index in range(depth):
        last = index == depth - 1
        for stream in ("x_block", "context_block"):
            pre_only = stream == "context_block" and last  # the last text stream stops after qkv
            layers = ["attn_qkv", "adaLN_modulation_1"]
            if not pre_only:
                layers += ["attn_proj", "mlp_fc1", "mlp_fc2"]
            if stream == "x_block" and index in dual_attention_layers:
                layers += ["attn2_qkv", "attn2_proj"]  # SD3.5-Medium's second image attention
            names |= {f"lora_unet_joint_blocks_{index}_{stream}_{layer}" for layer in layers}
    return names


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium"])
def test_kohya_keys_follow_the_published_rule_for_every_block(variant):
    model = adapted(variant)
    exported = lora_to_kohya(adapter_state_dict(model), ALPHA)
    modules = {key.split(".", 1)[0] for key in exported}
    assert modules == published_kohya_names(DEPTH, set(VARIANTS[variant][1]))
    for module in modules:
        assert exported[f"{module}.lora_down.weight"].shape[0] == RANK
        assert exported[f"{module}.lora_up.weight"].shape[1] == RANK
        assert float(exported[f"{module}.alpha"]) == ALPHA


def test_kohya_layout_round_trips_to_identical_outputs():
    model = adapted("sd3.5-medium")
    exported = lora_to_kohya(adapter_state_dict(model), ALPHA)
    fresh = our_model("sd3.5-medium")
    fresh.load_state_dict(base_state_dict(model), strict=True)
    add_adapter(fresh, "lora", adapter_targets(fresh, TARGETS), rank=RANK, alpha=ALPHA)
    names = [name for name, _ in our_model("sd3.5-medium").named_modules()]
    adapter, alpha = lora_from_kohya(exported, names)
    assert alpha == ALPHA
    load_adapter_state_dict(fresh, adapter)
    latents, t, context, pooled = inputs(8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(latents, t, context, pooled), model(latents, t, context, pooled))


def test_other_adapter_kinds_are_refused_by_the_lora_layouts():
    model = our_model("sd3-medium")
    add_adapter(model, "loha", adapter_targets(model, ["attention"]), rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="only plain LoRA"):
        lora_to_kohya(adapter_state_dict(model), ALPHA)
