"""`load_transformer`: our MM-DiT from any checkpoint layout (see `sd3train.checkpoint.formats`).

    from sd3train.checkpoint import load_transformer
    model = load_transformer("sd3.5_medium.safetensors", dtype=torch.bfloat16)   # Stability single file
    model = load_transformer("stable-diffusion-3.5-large/")                    # diffusers pipeline
    model = load_transformer("runs/tiny_cpu/main/checkpoints/last")            # ours (EMA weights)
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd3train.checkpoint.architecture import mmdit_config_from_diffusers, mmdit_config_from_weights
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
    DIFFUSERS_MMDIT,
    LIGHTNING,
    PIPELINE,
    TRANSFORMER_PREFIX,
    dataclass_from_dict,
    detect,
    export_metadata,
    mmdit_naming,
)
from sd3train.checkpoint.mmdit_diffusers import diffusers_to_official
from sd3train.checkpoint.adapters import check_adapter_base
from sd3train.checkpoint.training import TrainingCheckpoint, read_training_checkpoint
from sd3train.config.schema import ModelConfig
from sd3train.model.adapters import apply_adapter_config, is_adapter_key, merged_state_dict, weights_digest
from sd3train.model.mmdit import MMDiT
from sd3train.paths import resolve_repo_path

WHAT = "MM-DiT"


def _to_official(state: dict, depth: int, source: Path) -> dict:
    try:
        return diffusers_to_official(state, depth)
    except KeyError as error:
        raise CheckpointError(f"{WHAT} weights in {source} do not match: {error.args[0]}") from error


def _depth_of_diffusers(state: dict) -> int:
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")}
    return max(blocks) + 1


def transformer_from_diffusers_folder(folder: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict]:
    config = mmdit_config_from_diffusers(read_json(folder / "config.json"), str(folder))
    return config, _to_official(read_component_weights(folder, dtype), config.depth, folder)


def transformer_from_single_file(file: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict, str]:
    """(config, official-named state, the prefix the file stores it under)."""
    keys, metadata = safetensors_header(file)
    naming = mmdit_naming(keys)
    if naming is None:
        raise CheckpointError(
            f"no {WHAT} weights in {file}: no keys under {TRANSFORMER_PREFIX!r} (or bare joint_blocks.*)"
        )
    kind, prefix = naming
    if kind == DIFFUSERS_MMDIT:  # converted names are checked before the model sees them
        diffusers_state = read_safetensors(file, dtype=dtype)
        state = _to_official(diffusers_state, _depth_of_diffusers(diffusers_state), file)
    else:
        state = read_safetensors(file, select=with_prefix(prefix), dtype=dtype)
    stored = export_metadata(metadata, file).get("transformer")
    if stored:
        config = dataclass_from_dict(ModelConfig, stored)
    else:
        config = mmdit_config_from_weights(state, str(file), key_prefix=prefix)
    return config, state, prefix


def build_transformer(config: ModelConfig, state: dict, source: Path, key_prefix: str = "") -> MMDiT:
    """MMDiT of `config` holding exactly `state` (official names), without random init."""
    return assign_weights(on_meta(lambda: MMDiT.from_config(config)), state, str(source), WHAT, key_prefix)


def read_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict, Path, str]:
    """(architecture, official-named state, the file or folder it came from, the prefix its keys carry
    there) of the MM-DiT at `path`, in any layout `load_transformer` reads."""
    source = detect(path)
    if source.kind == LIGHTNING:
        checkpoint = read_training_checkpoint(source.path)
        if checkpoint.config.adapter.kind != "none":  # its base with the (EMA) adapter merged in
            merged = merged_state_dict(adapted_transformer(checkpoint))
            state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in merged.items()}
            return checkpoint.config.model, state, source.path, ""
        return checkpoint.config.model, checkpoint.transformer(dtype), source.path, checkpoint.transformer_prefix()
    if source.kind in (PIPELINE, COMPONENT):
        where = source.subfolder("transformer") if source.kind == PIPELINE else source.path
        config, state = transformer_from_diffusers_folder(where, dtype)
        return config, state, where, ""
    config, state, prefix = transformer_from_single_file(source.path, dtype)
    return config, state, source.path, prefix


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> MMDiT:
    """Our MM-DiT (eval mode, weights in `dtype`) from a single file, diffusers folder or .ckpt.

    A .ckpt gives its EMA weights when it has them. The architecture comes from config.json, the
    training config or the export metadata when there is one, else from the weights themselves.
    """
    config, state, where, prefix = read_transformer(path, dtype)
    return build_transformer(config, state, where, prefix)


def adapted_transformer(checkpoint: TrainingCheckpoint, use_ema: bool = True) -> torch.nn.Module:
    """The MM-DiT of an adapter run's checkpoint (eval mode): its base from `model.weights`, checked
    against the recorded digest, with the adapter loaded (the EMA adapter when there is one and
    `use_ema`), peft-wrapped."""
    cfg = checkpoint.config
    _, state, where, prefix = read_transformer(resolve_repo_path(cfg.model.weights))
    model = build_transformer(cfg.model, state, where, prefix)
    check_adapter_base(checkpoint.extra, weights_digest(model.state_dict()), cfg.model.weights)
    apply_adapter_config(model, cfg.adapter)
    source = "ema.shadow." if use_ema and checkpoint.has("ema") else "mmdit."
    adapter = {key[len(source):]: value for key, value in checkpoint.state_dict.items()
               if key.startswith(source) and is_adapter_key(key)}
    loaded = model.load_state_dict(adapter, strict=False)
    absent = [key for key in loaded.missing_keys if is_adapter_key(key)]
    if absent or loaded.unexpected_keys:
        raise CheckpointError(f"{checkpoint.path}: adapter weights do not fit its config: missing {absent[:10]}, "
                              f"unexpected {loaded.unexpected_keys[:10]}")
    return model.eval()
