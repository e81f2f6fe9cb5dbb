"""`load_text_encoder`: one of SD3's three text encoders from its own file or folder, as a transformers model.

    from sd3train.checkpoint.encoder_files import load_text_encoder
    clip_l = load_text_encoder("clip_l.safetensors", "clip_l")                       # ComfyUI
    clip_g = load_text_encoder("open_clip_model.safetensors", "clip_g")              # LAION bigG (OpenCLIP)
    t5 = load_text_encoder("t5xxl_fp16.safetensors", "t5", dtype=torch.bfloat16)

CLIP-L and bigG come back as `CLIPTextModelWithProjection`, T5 as `T5EncoderModel`, in eval mode,
built on the meta device and given the file's tensors (no random init, no second copy). Accepted:
  folder        a transformers model folder (config.json + model.safetensors, shards with an index,
                or pytorch_model.bin), loaded with its config; in a diffusers pipeline folder, the
                subfolder of `name`. A full CLIPModel or T5 folder gives its text encoder.
  transformers  one safetensors (or .bin/.pt) file with transformers names: `text_model.*` +
                `text_projection.weight`, or `encoder.block.*` + `shared.weight` and/or
                `encoder.embed_tokens.weight`; bare, or under our single-file prefix
                (`text_encoders.clip_g.transformer.`, ...).
  openclip      an OpenCLIP text tower (openclip_text.py), bare or under `text.`; in a full CLIP
                checkpoint the visual tower and logit scale are skipped.
The architecture of a file is read off its weights as in architecture.py: 64-wide heads,
quick_gelu for clip_l and gelu for clip_g; our exports' metadata overrides that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd3train.checkpoint.architecture import clip_config_from_weights, t5_config_from_weights
from sd3train.checkpoint.build import assign_weights, on_meta
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import (
    component_weight_files,
    read_json,
    read_safetensors,
    safetensors_header,
    torch_load,
)
from sd3train.checkpoint.formats import PIPELINE, PIPELINE_SUBFOLDERS, TEXT_PREFIXES, Source, export_metadata
from sd3train.checkpoint.openclip_text import OPENCLIP_NON_TEXT, is_openclip_text, transformers_from_openclip

ENCODER_NAMES = ("clip_l", "clip_g", "t5")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_DESCRIPTIONS = {"clip_l": "CLIP-L text encoder", "clip_g": "OpenCLIP bigG text encoder", "t5": "T5 encoder"}
# Widths of the released encoders: a CLIP-L file given as bigG (or the reverse) would load with the
# other's activation and pooling, so it fails instead.
_RELEASED_WIDTHS = {"clip_l": 768, "clip_g": 1280}
# Key namings of a file, and what each says the file holds.
HF_CLIP, HF_T5, OPENCLIP = "transformers_clip", "transformers_t5", "openclip"
_HOLDS = {
    HF_CLIP: "a CLIP text encoder (transformers names)",
    HF_T5: "a T5 encoder (transformers names)",
    OPENCLIP: "an OpenCLIP CLIP text tower",
}
# Keys that are not the text encoder: the position ids older transformers saved (rebuilt on load), a
# full CLIPModel's vision tower and logit scale, a full T5's decoder.
_CLIP_SKIPPED = ("text_model.embeddings.position_ids", "vision_model.", "visual_projection.", "logit_scale")
_T5_SKIPPED = ("decoder.", "lm_head.")
_FOLDER_FAMILIES = {"clip_text_model": "clip", "clip": "clip", "t5": "t5"}


# T5's input embedding is tied to its `shared` table; files may store either name or both.
_T5_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def build_clip(
    config: CLIPTextConfig, state: dict, source: str, name: str, key_prefix: str = ""
) -> CLIPTextModelWithProjection:
    if "text_projection.weight" not in state and config.projection_dim == config.hidden_size:
        # Stability's CLIP-L has no projection: SD3 pools its unprojected end token.
        dtype = next(iter(state.values())).dtype
        state = {**state, "text_projection.weight": torch.eye(config.hidden_size, dtype=dtype)}
    model = on_meta(lambda: CLIPTextModelWithProjection(config))
    return assign_weights(model, state, source, f"{name} text encoder", key_prefix)


def build_t5(config: T5Config, state: dict, source: str, key_prefix: str = "") -> T5EncoderModel:
    state = dict(state)
    for key, other in (_T5_TIED, _T5_TIED[::-1]):
        if key not in state and other in state:
            state[key] = state[other]
    model = assign_weights(on_meta(lambda: T5EncoderModel(config)), state, source, "T5 text encoder", key_prefix)
    model.tie_weights()  # one table again, as transformers builds it
    return model


def _select(prefix: str, skipped: tuple[str, ...]) -> Callable[[str], str | None]:
    """A `read_safetensors` select: keys under `prefix`, prefix removed, minus those starting with `skipped`."""

    def select(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        inner = key[len(prefix):]
        return None if inner.startswith(skipped) else inner

    return select


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    loaded = torch_load(file, weights_only=True, what="weight file")
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # an open_clip training checkpoint
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} holds a {type(loaded).__name__}, not a state dict")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if tensors and all(key.startswith("module.") for key in tensors):  # saved from DistributedDataParallel
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


class _WeightFile:
    """The keys of one weight file, and its tensors on request (from safetensors, only those selected)."""

    def __init__(self, file: Path, dtype: torch.dtype):
        self.file, self.dtype = file, dtype
        if file.suffix in TORCH_SUFFIXES:
            self._loaded = _torch_load(file)
            self.keys, self.metadata = list(self._loaded), {}
        else:  # safetensors whatever the suffix; a file of another kind fails naming itself
            self._loaded = None
            self.keys, self.metadata = safetensors_header(file)

    def read(self, select: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
        if self._loaded is None:
            return read_safetensors(self.file, select=select, dtype=self.dtype)
        return {
            name: tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            for key, tensor in self._loaded.items()
            if (name := select(key)) is not None
        }


def _locate(keys: list[str], file: Path, name: str) -> tuple[str, str]:
    """(naming, prefix) of the text encoder among `keys`: under our prefix for `name`, else bare or `text.`."""
    if any(key.startswith(TEXT_PREFIXES[name]) for key in keys):
        prefixes = (TEXT_PREFIXES[name],)
    else:
        others = [other for other, prefix in TEXT_PREFIXES.items() if any(key.startswith(prefix) for key in keys)]
        if others:
            listed = ", ".join(f"{other} (under {TEXT_PREFIXES[other]!r})" for other in others)
            raise CheckpointError(f"{file} holds {listed}, not {name} (no keys under {TEXT_PREFIXES[name]!r})")
        prefixes = ("", "text.")
    for prefix in prefixes:
        inside = [key[len(prefix):] for key in keys if key.startswith(prefix)]
        if any(key.startswith("text_model.") for key in inside):
            return HF_CLIP, prefix
        if any(key.startswith("encoder.block.") for key in inside):
            return HF_T5, prefix
        if is_openclip_text(inside):
            return OPENCLIP, prefix
    first = repr(sorted(keys)[0]) if keys else "none"
    raise CheckpointError(
        f"{file} holds no text encoder this loader knows (transformers CLIP `text_model.*`, transformers "
        f"T5 `encoder.block.*`, or OpenCLIP `transformer.resblocks.*`); first key {first}"
    )


def _check_family(holds_t5: bool, holds: str, source: str, name: str) -> None:
    if holds_t5 != (name == "t5"):
        hint = "t5" if holds_t5 else "clip_l or clip_g"
        raise CheckpointError(f"{source} holds {holds}, not {name!r} ({_DESCRIPTIONS[name]}): load it as {hint}")


def _clip(config: CLIPTextConfig, state: dict, source: str, name: str, key_prefix: str = "") -> nn.Module:
    other = "clip_g" if name == "clip_l" else "clip_l"
    if config.hidden_size == _RELEASED_WIDTHS[other]:
        raise CheckpointError(
            f"{source} holds a {config.hidden_size}-wide CLIP text encoder, the width of {other}, not "
            f"{name}: load it as {other!r}"
        )
    if "text_projection.weight" not in state:
        if name == "clip_g":  # SD3 pools bigG through its projection; Stability's CLIP-L has none
            raise CheckpointError(
                f"{source} holds a CLIP text encoder without {key_prefix}text_projection.weight, as "
                "Stability ships CLIP-L; bigG has a projection: load it as 'clip_l'?"
            )
        config.projection_dim = config.hidden_size  # build_clip then pools the unprojected end token
    return build_clip(config, state, source, name, key_prefix)


def _from_folder(folder: Path, name: str, dtype: torch.dtype) -> nn.Module:
    if (folder / "model_index.json").is_file() or (
        not (folder / "config.json").is_file() and (folder / PIPELINE_SUBFOLDERS[name] / "config.json").is_file()
    ):  # a diffusers pipeline folder: the subfolder of `name`
        folder = Source(PIPELINE, folder).subfolder(name)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is a folder without config.json: not a transformers model folder")
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    family = _FOLDER_FAMILIES.get(model_type)
    if family is None:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {model_type!r} is neither a CLIP text model nor T5"
        )
    holds = f"a {'T5' if family == 't5' else 'CLIP'} model (config.json model_type {model_type!r})"
    _check_family(family == "t5", holds, str(folder), name)
    legacy = folder / "pytorch_model.bin"
    has_safetensors = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    files = [legacy] if legacy.is_file() and not has_safetensors else component_weight_files(folder)
    select = _select("", _T5_SKIPPED if family == "t5" else _CLIP_SKIPPED)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_WeightFile(file, dtype).read(select))
    if family == "t5":
        return build_t5(T5Config.from_dict(config), state, str(folder))
    if model_type == "clip":  # a full CLIPModel: its projection width is a top-level field
        config = {**config.get("text_config", {}), "projection_dim": config.get("projection_dim", 512)}
    return _clip(CLIPTextConfig.from_dict(config), state, str(folder), name)


def _from_file(file: Path, name: str, dtype: torch.dtype) -> nn.Module:
    weights = _WeightFile(file, dtype)
    naming, prefix = _locate(weights.keys, file, name)
    source = str(file)
    _check_family(naming == HF_T5, _HOLDS[naming] + (f" under {prefix!r}" if prefix else ""), source, name)
    stored = export_metadata(weights.metadata, file).get("text", {}).get(name)  # our exports' configs
    if naming == HF_T5:
        state = weights.read(_select(prefix, _T5_SKIPPED))
        config = T5Config.from_dict(stored) if stored else t5_config_from_weights(state, source, key_prefix=prefix)
        return build_t5(config, state, source, prefix)
    if naming == HF_CLIP:
        state = weights.read(_select(prefix, _CLIP_SKIPPED))
        config = (CLIPTextConfig.from_dict(stored) if stored
                  else clip_config_from_weights(state, source, name, key_prefix=prefix))
        return _clip(config, state, source, name, prefix)
    what = f"{name} text encoder (OpenCLIP names)"
    state = transformers_from_openclip(weights.read(_select(prefix, OPENCLIP_NON_TEXT)), source, what, prefix)
    # OpenCLIP stacks all heads in one in_proj matrix, so no shape tells the head count;
    # clip_config_from_weights takes width // 64, the head width of every OpenCLIP text tower
    # (bigG 1280 = 20 x 64, ViT-L 768 = 12 x 64, ViT-H 1024 = 16 x 64). The activation follows
    # `name`: exact gelu for bigG, quick_gelu for OpenAI's CLIP-L (open_clip's ViT-L-14 OpenAI model).
    return _clip(clip_config_from_weights(state, source, name), state, source, name)


def load_text_encoder(path: str | Path, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The `name` encoder ("clip_l", "clip_g" or "t5") from a file or folder (see the module docstring).

    CheckpointError names the file and the first missing or unexpected key, or what the file holds
    when it is not the `name` encoder; FileNotFoundError if `path` does not exist.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"name must be one of {', '.join(ENCODER_NAMES)}, got {name!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text encoder weights {path} do not exist")
    if path.is_dir():
        return _from_folder(path, name, dtype)
    return _from_file(path, name, dtype)
