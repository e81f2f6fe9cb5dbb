"""Write our models as one Stability-style safetensors file.

Keys: the MM-DiT under `model.diffusion_model.` (official names, which are ours), the VAE under
`first_stage_model.` (LDM names), and, when asked, the text encoders under
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (transformers names) -- the layout of
Stability's `sd3_medium_incl_clips_t5xxlfp8.safetensors`, which diffusers' `from_single_file`
and ComfyUI read. What no tensor shape records (head count, VAE norm groups and latent factors,
encoder configs, tokenizer lengths, the sampler shift) goes into the header metadata under
"sd3train", so `sd3train.checkpoint` loaders read the file back exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sd3train.checkpoint.architecture import mmdit_config_of, vae_config_of
from sd3train.checkpoint.files import save_safetensors_atomic
from sd3train.checkpoint.formats import METADATA_KEY, TEXT_PREFIXES, TRANSFORMER_PREFIX, VAE_PREFIX
from sd3train.checkpoint.vae_ldm import diffusers_to_ldm
from sd3train.model.mmdit import MMDiT
from sd3train.model.text_encoders import TextConditioner
from sd3train.model.tokenizers import CLIP_EOS_ID
from sd3train.model.vae import VAE


def _text_tensors(text: TextConditioner) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, encoder in zip(("clip_l", "clip_g", "t5"), text.encoders()):
        state = encoder.state_dict()
        if name == "t5":
            # Tied tables share memory, which safetensors refuses; both names are written because
            # readers look for either (diffusers `shared.weight`, others `encoder.embed_tokens.weight`).
            state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"].clone()
        tensors.update({TEXT_PREFIXES[name] + key: value for key, value in state.items()})
    return tensors


def _text_metadata(text: TextConditioner) -> dict:
    return {
        # Through JSON, as config.json would be: to_dict() may hold non-JSON values such as dtypes.
        "clip_l": json.loads(text.clip_l.config.to_json_string(use_diff=False)),
        "clip_g": json.loads(text.clip_g.config.to_json_string(use_diff=False)),
        "t5": json.loads(text.t5.config.to_json_string(use_diff=False)),
        "clip_max_length": text.tokenizers["clip_l"].max_length,
        "clip_l_pad_with_end": text.tokenizers["clip_l"].pad_id == CLIP_EOS_ID,
        "clip_g_pad_with_end": text.tokenizers["clip_g"].pad_id == CLIP_EOS_ID,
        "t5_max_length": text.tokenizers["t5"].max_length,
    }


def single_file_tensors(transformer: MMDiT, vae: VAE, text: TextConditioner | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under its Stability key."""
    tensors = {TRANSFORMER_PREFIX + key: value for key, value in transformer.state_dict().items()}
    tensors.update({VAE_PREFIX + key: value for key, value in diffusers_to_ldm(vae.state_dict()).items()})
    if text is not None:
        tensors.update(_text_tensors(text))
    return tensors


def export_single_file(
    out: str | Path, transformer: MMDiT, vae: VAE, text: TextConditioner | None = None, *, shift: float
) -> Path:
    """Write the single file atomically (temporary sibling, then rename); returns `out`."""
    vae_config = dataclasses.asdict(vae_config_of(vae))
    vae_config.pop("weights")
    stored = {
        "transformer": dataclasses.asdict(mmdit_config_of(transformer)),
        "vae": vae_config,
        "scheduler": {"shift": float(shift)},
    }
    if text is not None:
        stored["text"] = _text_metadata(text)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(stored, sort_keys=True)}
    return save_safetensors_atomic(single_file_tensors(transformer, vae, text), Path(out), metadata)
