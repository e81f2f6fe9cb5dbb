"""What a checkpoint path is, and how each layout names its components.

Four layouts are read:
  single_file  one Stability safetensors: MM-DiT under `model.diffusion_model.`, the VAE (LDM
               names) under `first_stage_model.`, optionally the text encoders under
               `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (transformers names). A file
               holding one bare component (no prefix) is read too.
  pipeline     a diffusers pipeline folder: transformer/, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/.
  component    one diffusers (or transformers) component folder: config.json + safetensors.
  lightning    a .ckpt from sd3train-train: state_dict with mmdit.*, ema.shadow.*, vae.*, text.*
               and the training config under `sd3train_config`. sd3train-train publishes each one
               as a step directory, runs/<exp>/<run>/checkpoints/step-NNNNNNN/ (or the `last`
               symlink to the newest), holding checkpoint.ckpt (a file, or a DeepSpeed ZeRO
               directory), config.yaml and the COMPLETE marker (`step_dirs`); either path is read as
               this layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.step_dirs import TRAINING_CHECKPOINT_FILE

SINGLE_FILE, PIPELINE, COMPONENT, LIGHTNING = "single_file", "pipeline", "component", "lightning"

# Stability single-file prefixes.
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
# Safetensors metadata key under which sd3train's exports store what weights cannot tell
# (head count, VAE group count and factors, encoder configs, tokenizer lengths, sampler shift).
METADATA_KEY = "sd3train"

# Prefixes in sd3train's Lightning state_dict.
LIGHTNING_PREFIXES = {"transformer": "mmdit.", "ema": "ema.shadow.", "vae": "vae.", "text": "text."}

# diffusers pipeline subfolders.
PIPELINE_SUBFOLDERS = {
    "transformer": "transformer",
    "vae": "vae",
    "scheduler": "scheduler",
    "clip_l": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5": "text_encoder_3",
    "clip_l_tokenizer": "tokenizer",
    "clip_g_tokenizer": "tokenizer_2",
    "t5_tokenizer": "tokenizer_3",
}
# The pipeline subfolders of the three text encoders, in the order of the conditioner's encoders.
TEXT_ENCODER_SUBFOLDERS = {name: PIPELINE_SUBFOLDERS[name] for name in ("clip_l", "clip_g", "t5")}

# Key naming of a bare state dict, told by one characteristic key prefix.
OFFICIAL_MMDIT, DIFFUSERS_MMDIT = "official", "diffusers"
LDM_VAE, DIFFUSERS_VAE = "ldm", "diffusers"


@dataclass(frozen=True)
class Source:
    kind: str
    path: Path

    def subfolder(self, component: str) -> Path:
        """A pipeline's component folder; CheckpointError if the pipeline lacks it."""
        folder = self.path / PIPELINE_SUBFOLDERS[component]
        if not folder.is_dir():
            raise CheckpointError(f"{self.path} is a diffusers pipeline folder without {folder.name}/")
        return folder


def detect(path: str | Path) -> Source:
    """The layout of `path` (see the module docstring); FileNotFoundError if it does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth"):
            return Source(LIGHTNING, path)
        return Source(SINGLE_FILE, path)  # read as safetensors; a non-safetensors file fails naming itself
    # A published step directory (or `last`), or a DeepSpeed checkpoint directory `*.ckpt/`.
    if (path / TRAINING_CHECKPOINT_FILE).exists() or path.suffix == ".ckpt":
        return Source(LIGHTNING, path)
    if (path / "model_index.json").is_file() or any(
        (path / PIPELINE_SUBFOLDERS[name] / "config.json").is_file() for name in ("transformer", "vae")
    ):
        return Source(PIPELINE, path)
    if (path / "config.json").is_file():
        return Source(COMPONENT, path)
    raise CheckpointError(
        f"{path} is neither a diffusers pipeline folder (model_index.json, transformer/, vae/) "
        "nor a component folder (config.json + safetensors)"
    )


def mmdit_naming(keys: list[str]) -> tuple[str, str] | None:
    """(naming, prefix) of the MM-DiT keys among `keys`, or None if there are none."""
    if any(key.startswith(TRANSFORMER_PREFIX) for key in keys):
        return OFFICIAL_MMDIT, TRANSFORMER_PREFIX
    if any(key.startswith("joint_blocks.") for key in keys):
        return OFFICIAL_MMDIT, ""
    if any(key.startswith("transformer_blocks.") for key in keys):
        return DIFFUSERS_MMDIT, ""
    return None


def vae_naming(keys: list[str]) -> tuple[str, str] | None:
    """(naming, prefix) of the VAE keys among `keys`, or None if there are none."""
    for prefix in (VAE_PREFIX, ""):
        inside = [key[len(prefix):] for key in keys if key.startswith(prefix)]
        if any(key.startswith("encoder.down_blocks.") for key in inside):
            return DIFFUSERS_VAE, prefix
        if any(key.startswith("encoder.down.") for key in inside):
            return LDM_VAE, prefix
    return None


def export_metadata(metadata: dict[str, str], file: Path) -> dict:
    """What an sd3train export stored in a safetensors header ({} for other files)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"{file}: unreadable {METADATA_KEY!r} metadata: {error}") from error


def dataclass_from_dict(cls, values: dict):
    """`cls(**values)` ignoring keys `cls` does not know (metadata written by another version)."""
    known = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})
