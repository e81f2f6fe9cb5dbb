"""`load_text_conditioner`: CLIP-L + bigG + T5 with their tokenizers, as one `TextConditioner`.

    from sd3train.checkpoint import load_text_conditioner
    text = load_text_conditioner("stable-diffusion-3.5-medium/")   # diffusers pipeline folder
    context, pooled = text.encode(["a red circle on a white background"])

Sources: a diffusers pipeline folder (text_encoder{,_2,_3}/, tokenizer{,_2,_3}/), our .ckpt, or a
single file with `text_encoders.*` keys (it holds no tokenizers: the T5 one must be given as
`t5_tokenizer=FOLDER`; CLIP's is derived offline). Per-encoder dropout is off: this is for inference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sd3train.checkpoint.build import assign_weights, on_meta
from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.checkpoint.encoder_files import load_text_encoder
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import read_json, safetensors_header
from sd3train.checkpoint.formats import (
    COMPONENT,
    LIGHTNING,
    LIGHTNING_PREFIXES,
    PIPELINE,
    TEXT_ENCODER_SUBFOLDERS,
    TEXT_PREFIXES,
    Source,
    detect,
    export_metadata,
)
from sd3train.checkpoint.tokenizer_files import config_tokenizers, load_clip_tokenizer, load_t5_tokenizer
from sd3train.checkpoint.text_adapters import (
    merge_text_adapter,
    merged_text_encoders,
    saved_text_base,
    text_adapter_weights,
)
from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.model.adapters import is_adapter_key, our_name
from sd3train.model.text_encoders import CLIP_MAX_POSITIONS, TextConditioner
from sd3train.model.tokenizers import PromptTokenizer

# T5 tokens per prompt when nothing says otherwise: 77 for Stability single files (SD3's reference
# sampler), at most 256 for diffusers folders (StableDiffusion3Pipeline's max_sequence_length default).
DEFAULT_T5_MAX_LENGTH = 77
PIPELINE_T5_MAX_LENGTH = 256
NO_DROPOUT = (0.0, 0.0, 0.0)


def _configured_pad_token(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            token = read_json(folder / name).get("pad_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return token
    return None


def _clip_max_length(model_max_length: int, encoders: dict) -> int:
    # Unset model_max_length is a huge sentinel in transformers; positions bound it anyway.
    positions = min(encoders[name].config.max_position_embeddings for name in ("clip_l", "clip_g"))
    return min(int(model_max_length), positions, CLIP_MAX_POSITIONS)


def _pipeline_tokenizers(
    folder: Path, encoders: dict, t5_max_length: int | None, t5_tokenizer: str | Path | None
) -> dict[str, PromptTokenizer]:
    tokenizers = {}
    clip_folders = {"clip_l": folder / "tokenizer", "clip_g": folder / "tokenizer_2"}
    # The pipeline pads both CLIP prompts to tokenizer/'s length.
    first = load_clip_tokenizer(clip_folders["clip_l"]) if clip_folders["clip_l"].is_dir() else load_clip_tokenizer()
    max_length = _clip_max_length(first.model_max_length, encoders)
    for name, sub in clip_folders.items():
        tokenizer = first if name == "clip_l" or not sub.is_dir() else load_clip_tokenizer(sub)
        pad = _configured_pad_token(sub) if sub.is_dir() else None
        if pad is None:  # SD3 pads CLIP-L with its end token and bigG with "!"
            tokenizers[name] = PromptTokenizer.clip(tokenizer, max_length, pad_with_end=name == "clip_l")
        else:  # the pad token the pipeline pads with (our tokenizer keeps <|endoftext|> as its own pad)
            tokenizers[name] = PromptTokenizer(tokenizer, max_length, tokenizer.convert_tokens_to_ids(pad))
    t5_folder = Path(t5_tokenizer) if t5_tokenizer is not None else folder / "tokenizer_3"
    t5 = load_t5_tokenizer(t5_folder)
    if t5_max_length is None:
        # The pipeline's default, or the shorter length a tokenizer records (sd3train-export writes
        # the training length there; released SD3 folders say 512).
        t5_max_length = min(int(t5.model_max_length), PIPELINE_T5_MAX_LENGTH)
    tokenizers["t5"] = PromptTokenizer.t5(t5, t5_max_length)
    return tokenizers


def _from_pipeline(folder: Path, dtype, t5_max_length: int | None, t5_tokenizer) -> TextConditioner:
    missing = [sub for sub in TEXT_ENCODER_SUBFOLDERS.values() if not (folder / sub / "config.json").is_file()]
    if missing:
        listed = ", ".join(f"{sub}/config.json" for sub in missing)
        raise CheckpointError(f"no text encoders in {folder}: missing {listed}")
    encoders = {name: load_text_encoder(folder, name, dtype) for name in TEXT_ENCODER_SUBFOLDERS}
    tokenizers = _pipeline_tokenizers(folder, encoders, t5_max_length, t5_tokenizer)
    return TextConditioner(encoders["clip_l"], encoders["clip_g"], encoders["t5"], tokenizers, NO_DROPOUT)


def _from_single_file(file: Path, dtype, t5_max_length: int | None, t5_tokenizer) -> TextConditioner:
    keys, metadata = safetensors_header(file)
    absent = [prefix for prefix in TEXT_PREFIXES.values() if not any(key.startswith(prefix) for key in keys)]
    if absent:
        raise CheckpointError(f"no text encoders in {file}: no keys under {', '.join(map(repr, absent))}")
    if t5_tokenizer is None:
        raise CheckpointError(f"{file} holds no tokenizers: pass t5_tokenizer=<folder with the T5 spiece.model>")
    stored = export_metadata(metadata, file).get("text", {})
    encoders = {name: load_text_encoder(file, name, dtype) for name in TEXT_PREFIXES}
    clip_tokenizer = load_clip_tokenizer()
    clip_length = stored.get("clip_max_length", _clip_max_length(CLIP_MAX_POSITIONS, encoders))
    tokenizers = {
        "clip_l": PromptTokenizer.clip(clip_tokenizer, clip_length, stored.get("clip_l_pad_with_end", True)),
        "clip_g": PromptTokenizer.clip(clip_tokenizer, clip_length, stored.get("clip_g_pad_with_end", False)),
        "t5": PromptTokenizer.t5(load_t5_tokenizer(t5_tokenizer),
                                 t5_max_length or stored.get("t5_max_length", DEFAULT_T5_MAX_LENGTH)),
    }
    return TextConditioner(encoders["clip_l"], encoders["clip_g"], encoders["t5"], tokenizers, NO_DROPOUT)


def _from_training(source: Source, dtype, t5_max_length: int | None, t5_tokenizer) -> TextConditioner:
    checkpoint = read_training_checkpoint(source.path)
    text = checkpoint.config.text
    if t5_max_length is not None:
        text = dataclasses.replace(text, t5=dataclasses.replace(text.t5, max_length=t5_max_length))
    if t5_tokenizer is not None:
        # Relative to the working directory, like the path argument (config paths start at the repo root).
        text = dataclasses.replace(text, t5_tokenizer=str(Path(t5_tokenizer).expanduser().resolve()))
    adapted = checkpoint.config.adapter.text_encoders  # their (EMA) adapters are merged in
    if not saved_text_base(checkpoint.state_dict):  # encoders loaded from the folder the config names, not saved
        merged = merged_text_encoders(checkpoint, dtype) if adapted else None
        conditioner = text_conditioner_from_config(text, dtype=dtype, encoders=merged)
    else:  # the saved encoders, adopted by a conditioner built on meta
        tokenizers = config_tokenizers(text)  # (CLIP, T5)
        conditioner = on_meta(lambda: TextConditioner.from_config(text, *tokenizers, dtype))
        # An adapted encoder's base is saved under peft's names (`q_proj.base_layer.weight`).
        state = {our_name(key): value for key, value in checkpoint.component("text", dtype).items()
                 if not is_adapter_key(key)}
        assign_weights(conditioner, state, str(source.path), "text encoder", LIGHTNING_PREFIXES["text"])
        conditioner.t5.tie_weights()
        for name in adapted:
            merge_text_adapter(getattr(conditioner, name), checkpoint.config.adapter,
                               text_adapter_weights(checkpoint, name))
    conditioner.dropout = NO_DROPOUT
    return conditioner


def load_text_conditioner(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    t5_max_length: int | None = None,
    t5_tokenizer: str | Path | None = None,
) -> TextConditioner:
    """Frozen encoders and tokenizers; `encode(prompts) -> (context, pooled)` without dropout.

    `t5_max_length`: T5 tokens per prompt. Default: a .ckpt's training length; a diffusers folder's
    StableDiffusion3Pipeline default 256 (less if its tokenizer_3 records less, as our exports do);
    a single file's export metadata, else 77.
    `t5_tokenizer`: a folder with the T5 tokenizer, required for single files (which hold none).
    """
    source = detect(path)
    if source.kind == LIGHTNING:
        return _from_training(source, dtype, t5_max_length, t5_tokenizer)
    if source.kind == PIPELINE:
        return _from_pipeline(source.path, dtype, t5_max_length, t5_tokenizer)
    if source.kind == COMPONENT:
        raise CheckpointError(
            f"{source.path} is one component folder; the text conditioner needs the pipeline folder holding "
            + ", ".join(f"text_encoder{suffix}/" for suffix in ("", "_2", "_3"))
        )
    return _from_single_file(source.path, dtype, t5_max_length, t5_tokenizer)

