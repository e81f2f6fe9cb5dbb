"""Adapters on the CLIP-L and bigG text encoders (`adapter.text_encoders=[clip_l, clip_g]`): built from
a config, recorded in and read back from training checkpoints, merged for export.

    encoders, digests = adapted_text_encoders_from_config(cfg.text, cfg.adapter, cfg.model.adapter_weights,
                                                          base_dtype=torch.bfloat16)
    check_text_adapter_base(checkpoint_dict, digests, names_whose_base_is_not_saved)
    adapter = text_adapter_weights(training_checkpoint, "clip_l")     # its (EMA) adapter, our names
    encoders = merged_text_encoders(training_checkpoint, dtype)         # plain encoders, adapters merged in

A training checkpoint holds each adapted encoder's adapter under `text.<name>.` (peft names) and its
average under `text_ema.shadow.<name>.`. Its frozen base is saved with the other text encoders (when
they do not all come from files, `SD3LitModule.on_save_checkpoint`), else it comes from the files
the config names and must have the digest `sd3train_adapter_base["text_encoders"][name]` records.
Digests are of the fp32 weights, as loaded before the base is cast to the training dtype.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from sd3train.checkpoint.adapters import BASE_KEY
from sd3train.checkpoint.components import text_encoders_from_config, weight_sources
from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.lora_formats import read_text_lora_file
from sd3train.checkpoint.training import TrainingCheckpoint
from sd3train.config.schema import AdapterConfig, TextConfig
from sd3train.model.adapters import (
    apply_text_adapter_config,
    is_adapter_key,
    load_adapter_state_dict,
    merged_state_dict,
    our_name,
    weights_digest,
)
from sd3train.paths import resolve_repo_path

TEXT_PREFIX = "text."
TEXT_EMA_PREFIX = "text_ema.shadow."
RECORD_KEY = "text_encoders"  # in checkpoint[BASE_KEY]


def adapted_text_encoders_from_config(
    text: TextConfig, adapter: AdapterConfig, adapter_weights: str | None, base_dtype: torch.dtype
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """({name: encoder with adapters}, {name: digest of its base}) for each of `adapter.text_encoders`
    ({} and {} when none). The adapters start from `adapter_weights` (a LoRA file holding these
    encoders' keys) when given; the base is frozen and held in `base_dtype`, the adapters fp32."""
    names = list(adapter.text_encoders)
    if not names:
        return {}, {}
    encoders = text_encoders_from_config(text, names, torch.float32)
    digests = {name: weights_digest(encoder.state_dict()) for name, encoder in encoders.items()}
    for name, encoder in encoders.items():
        apply_text_adapter_config(encoder, adapter)
        if adapter_weights is not None:
            modules = [module for module, _ in encoder.named_modules()]
            load_adapter_state_dict(encoder, read_text_lora_file(resolve_repo_path(adapter_weights), name, modules,
                                                                 adapter.alpha, adapter.rank))
        for parameter in encoder.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(base_dtype)
    return encoders, digests


def text_base_record(text: TextConfig, digests: dict[str, str]) -> dict[str, dict]:
    """What `sd3train_adapter_base["text_encoders"]` holds: per adapted encoder, the weights its base
    came from (None: random init from `init_seed`) and the base's digest."""
    sources = weight_sources(text)
    return {name: {"weights": sources.get(name), "init_seed": None if name in sources else text.init_seed,
                   "digest": digest} for name, digest in digests.items()}


def check_text_adapter_base(checkpoint: dict, digests: dict[str, str], names: Iterable[str]) -> None:
    """Refuse (CheckpointError, naming both) text adapters trained on another base than the one here,
    for the encoders `names` (those whose base the checkpoint does not hold)."""
    record = (checkpoint.get(BASE_KEY) or {}).get(RECORD_KEY, {})
    for name in names:
        if name not in record:
            raise CheckpointError(f"the checkpoint holds no {name} adapter base record: it was not written by a run "
                                  f"with adapter.text_encoders including {name}")
        if record[name]["digest"] != digests[name]:
            saved = record[name]["weights"] or f"random init (text.init_seed={record[name]['init_seed']})"
            raise CheckpointError(
                f"the {name} adapter was trained on the base {saved} (digest {record[name]['digest']}), but this "
                f"run's {name} has digest {digests[name]}: load it onto the text encoder it was trained on")


def saved_text_base(state: dict) -> bool:
    """Whether a training checkpoint's state holds the text encoders' frozen weights (not only adapters)."""
    return any(key.startswith(TEXT_PREFIX) and not is_adapter_key(key) for key in state)


def text_adapter_weights(checkpoint: TrainingCheckpoint, name: str, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Text encoder `name`'s adapter in our names (`text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`):
    the EMA one when the run kept an average and `use_ema`."""
    ema = TEXT_EMA_PREFIX + name + "."
    prefix = ema if use_ema and any(key.startswith(ema) for key in checkpoint.state_dict) else f"{TEXT_PREFIX}{name}."
    adapter = {our_name(key[len(prefix):]): value for key, value in checkpoint.state_dict.items()
               if key.startswith(prefix) and is_adapter_key(key)}
    if not adapter:
        raise CheckpointError(f"{checkpoint.path}: no {name} adapter weights under {prefix}")
    return adapter


def merge_text_adapter(encoder: nn.Module, adapter: AdapterConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`encoder` (a plain CLIP text model) with `weights` merged into its base, in place, by peft's merge
    on an adapted copy; returns it."""
    adapted = apply_text_adapter_config(copy.deepcopy(encoder).float(), adapter)
    load_adapter_state_dict(adapted, weights)
    merged = merged_state_dict(adapted)
    dtypes = {key: value.dtype for key, value in encoder.state_dict().items()}
    encoder.load_state_dict({key: value.to(dtypes[key]) for key, value in merged.items()})
    return encoder


def merged_text_encoders(checkpoint: TrainingCheckpoint, dtype: torch.dtype, use_ema: bool = True) -> dict[str, nn.Module]:
    """The adapted encoders of a run whose base came from files or the seeded init (not saved): built
    from its config in fp32, checked against the recorded digests, the (EMA) adapters merged in, in `dtype`."""
    cfg = checkpoint.config
    names = list(cfg.adapter.text_encoders)
    encoders = text_encoders_from_config(cfg.text, names, torch.float32)
    check_text_adapter_base(checkpoint.extra, {name: weights_digest(encoders[name].state_dict()) for name in names},
                            names)
    return {name: merge_text_adapter(encoder, cfg.adapter, text_adapter_weights(checkpoint, name, use_ema)).to(dtype)
            for name, encoder in encoders.items()}
