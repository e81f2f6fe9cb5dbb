"""`load_vae`: our SD3 VAE from any checkpoint layout (see `sd3train.checkpoint.formats`).

    from sd3train.checkpoint import load_vae
    vae = load_vae("sd3.5_large.safetensors")        # `first_stage_model.*`, LDM names
    latents = vae.encode(images, sample=False)     # normalised posterior mean
    images = vae.decode(latents)

Also read: a diffusers pipeline (vae/) or AutoencoderKL folder, a folder with our VAEConfig
config.json beside its weights (data/vae_tiny), a bare VAE safetensors and our .ckpt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd3train.checkpoint.architecture import vae_config_from_diffusers, vae_config_from_weights
from sd3train.checkpoint.build import assign_weights, on_meta
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import (
    read_component_weights,
    read_json,
    read_safetensors,
    safetensors_header,
    with_prefix,
)
from sd3train.checkpoint.formats import (
    COMPONENT,
    LDM_VAE,
    LIGHTNING,
    LIGHTNING_PREFIXES,
    PIPELINE,
    VAE_PREFIX,
    dataclass_from_dict,
    detect,
    export_metadata,
    vae_naming,
)
from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.checkpoint.vae_ldm import ldm_to_diffusers
from sd3train.config.schema import VAEConfig
from sd3train.model.vae import VAE
from sd3train.paths import resolve_repo_path

WHAT = "VAE"
# File names looked for, in order, when a VAE's weights are a folder (diffusers first, then ours).
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "vae.safetensors")


def resolve_weights_file(path: str | Path) -> Path:
    """A safetensors file, or the first known weight file in a folder (or in its `vae/` subfolder,
    a diffusers pipeline root). Relative paths are taken from the repository root."""
    path = resolve_repo_path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path, path / "vae"):
            for name in WEIGHT_FILE_NAMES:
                if (folder / name).is_file():
                    return folder / name
        raise FileNotFoundError(f"no VAE weights in {path}: looked for {', '.join(WEIGHT_FILE_NAMES)} (and under vae/)")
    raise FileNotFoundError(f"VAE weights {path} do not exist")


def read_vae_file(file: Path, dtype: torch.dtype | None) -> tuple[dict, dict, str]:
    """(diffusers-named VAE state, export metadata, the prefix of keys still named as in the file)."""
    keys, metadata = safetensors_header(file)
    naming = vae_naming(keys)
    if naming is None:
        raise CheckpointError(f"no {WHAT} weights in {file}: no keys under {VAE_PREFIX!r} (or bare encoder.*)")
    kind, prefix = naming
    state = read_safetensors(file, select=with_prefix(prefix) if prefix else _vae_keys, dtype=dtype)
    if kind == LDM_VAE:
        try:
            state = ldm_to_diffusers(state, key_prefix=prefix)
        except CheckpointError as error:
            raise CheckpointError(f"{WHAT} weights in {file}: {error}") from error
        prefix = ""  # the keys checked against the model are no longer the file's
    return state, export_metadata(metadata, file), prefix


def _vae_keys(key: str) -> str | None:
    # A bare VAE file: the encoder/decoder (and a stray quant conv, which the strict check names).
    return key if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) else None


def _folder_vae(folder: Path, dtype: torch.dtype | None) -> tuple[VAEConfig, dict, Path]:
    config = read_json(folder / "config.json")
    if "_class_name" not in config and "block_out_channels" in config and "latent_channels" in config:
        # Our own VAEConfig json beside its weights (e.g. data/vae_tiny).
        file = resolve_weights_file(folder)
        state, _, _ = read_vae_file(file, dtype)
        return dataclass_from_dict(VAEConfig, {**config, "weights": None}), state, file
    state = read_component_weights(folder, dtype)
    return vae_config_from_diffusers(config, str(folder), state), state, folder


def build_vae(config: VAEConfig, state: dict, source: Path, key_prefix: str = "") -> VAE:
    """VAE of `config` holding exactly `state` (diffusers names), without random init."""
    model = on_meta(lambda: VAE.from_config(config))
    return assign_weights(model, state, str(source), WHAT, key_prefix)


def read_vae(
    path: str | Path, dtype: torch.dtype | None = torch.float32, norm_num_groups: int | None = None
) -> tuple[VAEConfig, dict, Path, str]:
    """(config, diffusers-named state, the file or folder it came from, the prefix its keys carry
    there) of the VAE at `path`, in any layout `load_vae` reads.

    Shift and scaling factors come from config.json, the training config or the export metadata,
    else SD3's (0.0609, 1.5305); a bare file's norm group count is `norm_num_groups`, else SD3's 32.
    """
    source = detect(path)
    if source.kind == LIGHTNING:
        checkpoint = read_training_checkpoint(source.path)
        config = checkpoint.config.vae
        if checkpoint.has("vae"):
            return config, checkpoint.component("vae", dtype), source.path, LIGHTNING_PREFIXES["vae"]
        if config.weights is None:
            raise CheckpointError(f"{source.path} holds no vae.* weights and its config names no vae.weights")
        # The run loaded its frozen VAE from a file and saved no copy.
        where = resolve_weights_file(config.weights)
        state, _, prefix = read_vae_file(where, dtype)
        return config, state, where, prefix
    if source.kind in (PIPELINE, COMPONENT):
        folder = source.subfolder("vae") if source.kind == PIPELINE else source.path
        config, state, where = _folder_vae(folder, dtype)
        return config, state, where, ""
    state, metadata, prefix = read_vae_file(source.path, dtype)
    stored = metadata.get("vae")
    if stored:
        config = dataclass_from_dict(VAEConfig, stored)
    else:
        config = vae_config_from_weights(state, str(source.path), norm_num_groups=norm_num_groups, key_prefix=prefix)
    return config, state, source.path, prefix


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> VAE:
    """Our VAE (eval mode, frozen weights in `dtype`) from a single file, diffusers folder or .ckpt
    (the layouts and defaults of `read_vae`)."""
    config, state, where, prefix = read_vae(path, dtype)
    return build_vae(config, state, where, prefix).requires_grad_(False)
