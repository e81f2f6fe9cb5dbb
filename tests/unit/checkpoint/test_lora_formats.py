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


# --------------------------------------------------------------------------- text encoders
PROMPTS = ["a red circle on a white background", "a very long caption that certainly runs past sixteen tokens"]


def adapted_text(seed: int = 7):
    """The tiny text conditioner (the seeded weights tiny_sd3_pipeline's encoders have too), its CLIP-L
    and bigG with random LoRAs on their attention projections."""
    from sd3train.checkpoint.components import text_conditioner_from_config
    from sd3train.config.adapter_schema import AdapterConfig
    from sd3train.model.adapters import apply_text_adapter_config
    from tests.support.reference_models import text_config

    text = text_conditioner_from_config(text_config("tiny"))
    generator = torch.Generator().manual_seed(seed)
    for name in ("clip_l", "clip_g"):
        encoder = apply_text_adapter_config(getattr(text, name), AdapterConfig(kind="lora", rank=RANK, alpha=ALPHA))
        with torch.no_grad():
            for _, parameter in sorted(encoder.named_parameters()):
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return text.eval()


def test_diffusers_pipeline_loads_our_text_lora_and_encodes_prompts_as_we_do():
    pytest.importorskip("diffusers")
    from sd3train.checkpoint.lora_formats import text_lora_to_diffusers
    from tests.support.reference_models import tiny_sd3_pipeline

    pipeline, t5_length = tiny_sd3_pipeline()  # our own: loading a LoRA changes its encoders
    text = adapted_text()
    lora = {key: value for name in ("clip_l", "clip_g")
            for key, value in text_lora_to_diffusers(adapter_state_dict(getattr(text, name)), name, ALPHA, RANK).items()}

    def encode_prompt():
        context, _, pooled, _ = pipeline.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device=torch.device("cpu"),
                                                       do_classifier_free_guidance=False, max_sequence_length=t5_length)
        return context, pooled

    base_context, base_pooled = encode_prompt()
    pipeline.load_lora_weights(lora)
    context, pooled = encode_prompt()
    ours_context, ours_pooled = text.encode(PROMPTS)
    assert relative_error(context, ours_context) < 1e-5 and relative_error(pooled, ours_pooled) < 1e-5
    assert relative_error(base_pooled, ours_pooled) > 1e-2  # the adapters change the encoding


def test_text_kohya_keys_follow_sd_scripts_and_round_trip(tmp_path):
    from safetensors.torch import save_file

    from sd3train.checkpoint.errors import CheckpointError
    from sd3train.checkpoint.lora_formats import TEXT_KOHYA_PREFIXES, read_lora_file, read_text_lora_file

    text, fresh = adapted_text(), adapted_text(seed=8)
    exported = {key: value for name in ("clip_l", "clip_g") for key, value in
                lora_to_kohya(adapter_state_dict(getattr(text, name)), ALPHA, TEXT_KOHYA_PREFIXES[name]).items()}
    # sd-scripts' lora_sd3.py: lora_te1 (CLIP-L) / lora_te2 (bigG) + the module path, dots as underscores.
    assert {key.split(".")[0] for key in exported} == {
        f"lora_te{index}_text_model_encoder_layers_{layer}_self_attn_{projection}_proj"
        for index in (1, 2) for layer in (0, 1) for projection in ("q", "k", "v", "out")}
    assert float(exported["lora_te2_text_model_encoder_layers_1_self_attn_q_proj.alpha"]) == ALPHA
    # A file with the MM-DiT's LoRA too, read back as each encoder's adapter: the same encodings.
    model = adapted("sd3-medium")
    save_file({**exported, **lora_to_kohya(adapter_state_dict(model), ALPHA)}, tmp_path / "lora.safetensors")
    for name in ("clip_l", "clip_g"):
        encoder = getattr(fresh, name)
        modules = [module for module, _ in encoder.named_modules()]
        load_adapter_state_dict(encoder, read_text_lora_file(tmp_path / "lora.safetensors", name, modules, ALPHA, RANK))
    assert all(torch.equal(a, b) for a, b in zip(fresh.encode(PROMPTS), text.encode(PROMPTS)))
    names = [module for module, _ in model.named_modules()]
    with pytest.raises(CheckpointError, match=r"adapts the text encoders \['clip_g'\]"):
        read_lora_file(tmp_path / "lora.safetensors", names, ALPHA, RANK, DEPTH, text_encoders=["clip_l"])
    assert read_lora_file(tmp_path / "lora.safetensors", names, ALPHA, RANK, DEPTH,
                          text_encoders=["clip_l", "clip_g"]).keys() == adapter_state_dict(model).keys()


def test_the_diffusers_text_layout_reads_back():
    from sd3train.checkpoint.lora_formats import lora_file_parts, text_lora_from_diffusers, text_lora_to_diffusers

    ours = adapter_state_dict(adapted_text().clip_g)
    exported = text_lora_to_diffusers(ours, "clip_g", ALPHA, RANK)
    assert all(key.startswith("text_encoder_2.text_model.encoder.layers.") for key in exported)
    layout, parts = lora_file_parts(exported)
    assert layout == "diffusers" and set(parts) == {"clip_g"}
    back = text_lora_from_diffusers(parts["clip_g"], "clip_g", ALPHA, RANK)
    assert back.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(back[key], ours[key], rtol=1e-6, atol=0)
    with pytest.raises(KeyError, match="neither the kohya"):
        lora_file_parts({**exported, "unet.down.lora_A.weight": torch.zeros(1)})
