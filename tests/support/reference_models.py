"""Tiny reference models for parity tests: diffusers' SD3 transformer and VAE, SD3's text layout
written out from the transformers models, and a whole random StableDiffusion3Pipeline, all offline.

diffusers is a test-only dependency: it is imported inside the functions, after the calling test
module's `pytest.importorskip("diffusers")`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from sd3train.config.compose import group_option
from sd3train.config.schema import CLIPEncoderConfig, T5EncoderConfig, TextConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
T5_TINY_TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "t5_tiny"

# Shaped like the released models at toy size: (qk_norm, dual_attention_layers).
MMDIT_VARIANTS = {
    "sd3-medium": (None, ()),
    "sd3.5-large": ("rms", ()),
    "sd3.5-medium": ("rms", (0,)),
}
MMDIT_DEPTH = 3  # a normal block, a dual-attention candidate and the pre-only last block
MMDIT_LATENT_SIZES = [(16, 16), (12, 20)]  # patch grids 8x8 and 6x10 (non-square), cropped from a 16x16 table
# Tiny SD3-like VAE widths (4 levels: downsampling 8, like SD3).
VAE_SIZES = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=2, norm_num_groups=8)
SD3_SHIFT_FACTOR, SD3_SCALING_FACTOR = 0.0609, 1.5305


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Small random normals in every parameter, zero-inits included, so every path is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def mmdit_inputs(height: int, width: int, batch: int = 2, seed: int = 3):
    """(latents, t, context, pooled) for `diffusers_transformer`'s default sizes (4 latent channels,
    7 text tokens 96 wide, pooled 48)."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, height, width, generator=generator),
        torch.rand(batch, generator=generator),
        torch.randn(batch, 7, 96, generator=generator),
        torch.randn(batch, 48, generator=generator),
    )


def diffusers_transformer(variant: str, *, in_channels: int = 4, context_dim: int = 96, pooled_dim: int = 48,
                          depth: int = MMDIT_DEPTH, seed: int = 1):
    """A perturbed tiny `SD3Transformer2DModel` (width 64 = 2 heads x 32, 16x16 position table)."""
    import diffusers

    qk_norm, dual = MMDIT_VARIANTS[variant]
    model = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=in_channels, num_layers=depth, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=context_dim, caption_projection_dim=64,
        pooled_projection_dim=pooled_dim, out_channels=in_channels, pos_embed_max_size=16,
        dual_attention_layers=dual, qk_norm=None if qk_norm is None else "rms_norm",
    )
    return perturb(model, seed=seed).eval()


def diffusers_vae(block_out_channels, layers_per_block, norm_num_groups, *, perturbed: bool = False, **config):
    """diffusers' AutoencoderKL as SD3 configures it (16 latent channels, no quant convs)."""
    import diffusers

    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **config,
    )
    if perturbed:
        # Random init leaves GroupNorm affines at 1/0; perturb every tensor so a swapped scale/bias shows.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, parameter in sorted(model.named_parameters()):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def text_config(name: str, **overrides) -> TextConfig:
    """The shipped `text=<name>` option as a TextConfig (the schema's defaults with conf/text/<name>.yaml
    on top; a required value left out stays '???'); unknown keys raise TypeError."""
    data = group_option("text", name)
    data["clip_l"] = CLIPEncoderConfig(**data["clip_l"])
    data["clip_g"] = CLIPEncoderConfig(**data["clip_g"])
    data["t5"] = T5EncoderConfig(**data["t5"])
    return dataclasses.replace(TextConfig(**data), **overrides)


def reference_sd3_layout(clip_l, clip_g, t5, token_ids: dict[str, torch.Tensor]):
    """SD3's (context, pooled) written out from the transformers models' own outputs, as diffusers'
    `StableDiffusion3Pipeline.encode_prompt` does it."""
    with torch.no_grad():
        out_l = clip_l(token_ids["clip_l"], output_hidden_states=True)
        out_g = clip_g(token_ids["clip_g"], output_hidden_states=True)
        hidden_t5 = t5(token_ids["t5"])[0]
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, hidden_t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, hidden_t5], dim=-2), torch.cat([out_l[0], out_g[0]], dim=-1)


def tiny_sd3_pipeline(shift: float = 3.0, seed: int = 1):
    """A random StableDiffusion3Pipeline at conf/text/tiny.yaml widths, built offline.

    Text encoders as sd3train builds them (CLIP-L 32, bigG 64, T5 128 wide; 16 tokens), a perturbed
    2-block MM-DiT with RMS qk norm, a 2-level 16-channel VAE (downsampling 2) and shift `shift`.
    """
    import diffusers
    from transformers import CLIPTokenizer

    from sd3train.checkpoint.components import text_conditioner_from_config
    from sd3train.checkpoint.tokenizer_files import clip_tokenizer_folder, load_t5_tokenizer

    text = text_conditioner_from_config(text_config("tiny"))
    clip_length, t5_length = text.tokenizers["clip_l"].max_length, text.tokenizers["t5"].max_length
    folder = str(clip_tokenizer_folder())
    transformer = diffusers_transformer("sd3.5-large", in_channels=16, context_dim=text.context_dim,
                                        pooled_dim=text.pooled_dim, depth=2, seed=seed)
    vae = diffusers_vae([16, 32], 1, 8, perturbed=True, shift_factor=SD3_SHIFT_FACTOR,
                        scaling_factor=SD3_SCALING_FACTOR)
    pipeline = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text.clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(folder, model_max_length=clip_length),
        text_encoder_2=text.clip_g,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, model_max_length=clip_length, pad_token="!"),
        text_encoder_3=text.t5,
        tokenizer_3=load_t5_tokenizer(T5_TINY_TOKENIZER),
    )
    return pipeline, t5_length
