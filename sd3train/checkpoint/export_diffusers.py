"""Write our models as a diffusers `StableDiffusion3Pipeline` folder, without importing diffusers.

    out/
      model_index.json
      transformer/  config.json, diffusion_pytorch_model.safetensors   (SD3Transformer2DModel)
      vae/          config.json, diffusion_pytorch_model.safetensors   (AutoencoderKL, SD3 variant)
      text_encoder/ text_encoder_2/   CLIPTextModelWithProjection (transformers' save_pretrained)
      text_encoder_3/                 T5EncoderModel
      tokenizer/ tokenizer_2/ tokenizer_3/
      scheduler/    scheduler_config.json                              (FlowMatchEulerDiscreteScheduler)

The folder is assembled under a temporary sibling name and renamed into place at the end.
Tensors are written in the dtype the modules hold (load them in the dtype you want to export).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

from sd3train.checkpoint.architecture import mmdit_config_of, vae_config_of
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import save_safetensors_atomic, write_json
from sd3train.checkpoint.formats import PIPELINE_SUBFOLDERS
from sd3train.checkpoint.mmdit_diffusers import official_to_diffusers
from sd3train.config.schema import ModelConfig, VAEConfig
from sd3train.durable import temporary_dir
from sd3train.model.mmdit import MMDiT
from sd3train.model.text_encoders import TextConditioner
from sd3train.model.vae import VAE

# Written into every config: the first diffusers release that reads SD3.5's qk norm and MMDiT-X layers.
DIFFUSERS_VERSION = "0.31.0"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
}


def transformer_config(config: ModelConfig) -> dict:
    """diffusers `SD3Transformer2DModel` config.json for our MM-DiT config."""
    hidden = config.hidden_size or 64 * config.depth
    heads = config.num_heads or config.depth
    unsupported = []
    if not config.qkv_bias:
        unsupported.append("qkv_bias=False (diffusers' attention always has q/k/v biases)")
    if config.mlp_ratio != 4.0:
        unsupported.append(f"mlp_ratio={config.mlp_ratio} (diffusers' feed-forward is 4x wide)")
    if unsupported:
        raise CheckpointError("this MM-DiT has no diffusers equivalent: " + "; ".join(unsupported))
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels or config.in_channels,
        "num_layers": config.depth,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "caption_projection_dim": hidden,
        "joint_attention_dim": config.context_dim,
        "pooled_projection_dim": config.pooled_dim,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": "rms_norm" if config.qk_norm == "rms" else None,
    }


def vae_config(config: VAEConfig) -> dict:
    """diffusers `AutoencoderKL` config.json (SD3's: no quant convs, latents shifted and scaled)."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "mid_block_add_attention": True,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_quant_conv,
        "force_upcast": True,
        "latents_mean": None,
        "latents_std": None,
        "sample_size": 1024,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
    }


def scheduler_config(shift: float) -> dict:
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "shift": float(shift),
        "use_dynamic_shifting": False,
    }


def _write_tokenizers(text: TextConditioner, folder: Path) -> None:
    """Tokenizers recording the pad token and length sd3train pads with (model_max_length: the
    pipeline pads CLIP prompts to it; our loader reads T5's back as the training length)."""
    staging = folder / ".tokenizer-staging"
    for name in ("clip_l", "clip_g"):
        prompt_tokenizer = text.tokenizers[name]
        prompt_tokenizer.tokenizer.save_pretrained(str(staging))
        pad_token = prompt_tokenizer.tokenizer.convert_ids_to_tokens(prompt_tokenizer.pad_id)
        # Reloaded to set the pad token and length through transformers rather than by editing its files.
        tokenizer = CLIPTokenizer.from_pretrained(
            str(staging), pad_token=pad_token, model_max_length=prompt_tokenizer.max_length, local_files_only=True
        )
        tokenizer.save_pretrained(str(folder / PIPELINE_SUBFOLDERS[f"{name}_tokenizer"]))
        shutil.rmtree(staging)
    t5 = text.tokenizers["t5"]
    t5.tokenizer.save_pretrained(str(staging))
    T5Tokenizer.from_pretrained(str(staging), model_max_length=t5.max_length, local_files_only=True).save_pretrained(
        str(folder / PIPELINE_SUBFOLDERS["t5_tokenizer"])
    )
    shutil.rmtree(staging)


def _write_pipeline(folder: Path, transformer: MMDiT, vae: VAE, text: TextConditioner, shift: float) -> None:
    model_config = mmdit_config_of(transformer)
    write_json(transformer_config(model_config), folder / "transformer" / "config.json")
    weights = official_to_diffusers(transformer.state_dict(), model_config.depth)
    save_safetensors_atomic(weights, folder / "transformer" / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(vae_config(vae_config_of(vae)), folder / "vae" / "config.json")
    save_safetensors_atomic(vae.state_dict(), folder / "vae" / WEIGHTS_NAME, metadata={"format": "pt"})
    for name, encoder in zip(("clip_l", "clip_g", "t5"), text.encoders()):
        encoder.save_pretrained(str(folder / PIPELINE_SUBFOLDERS[name]))
    _write_tokenizers(text, folder)
    write_json(scheduler_config(shift), folder / "scheduler" / "scheduler_config.json")
    write_json(MODEL_INDEX, folder / "model_index.json")  # last: its presence marks a complete folder


def export_diffusers(
    out: str | Path, transformer: MMDiT, vae: VAE, text: TextConditioner, *, shift: float, overwrite: bool = False
) -> Path:
    """Write a StableDiffusion3Pipeline folder at `out` atomically; returns `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=true to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_dir(out.parent, out.name)
    try:
        _write_pipeline(staging, transformer, vae, text, shift)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
