"""Adapted CLIP text encoders in the LightningModule (`adapter.text_encoders=[clip_l, clip_g]`).

    text, digests = build_text(cfg, frozen_dtype)              # the module's `text`; adapted encoders at text.<name>
    outputs.update(adapted_outputs(text, names, token_ids))     # with gradients, in the training step
    prompts = SamplingText(text, {"clip_l": ema_copy})          # .encode(prompts) with the EMA adapters

The adapted encoders are the module's `text.clip_l` / `text.clip_g` in every case, so checkpoints
name their adapters alike (`text.clip_l.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight`).

On the precompute cache (`data.cached=true`) T5's outputs, and an unadapted CLIP's, are still read
from the cache; the adapted encoders run live on the sample's cached caption (the very string the
cache encoded, sd3train/data/cache_format.py), since their outputs change as they train. They are
small beside T5-XXL (CLIP-L 0.12B, bigG 0.69B parameters), which never reaches the training device.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sd3train.checkpoint.components import text_conditioner_from_config
from sd3train.checkpoint.text_adapters import adapted_text_encoders_from_config
from sd3train.checkpoint.tokenizer_files import config_tokenizers
from sd3train.config.schema import TextConfig, TrainConfig
from sd3train.lit.prompts import CPUTextConditioner
from sd3train.model.text_encoders import (ENCODER_NAMES, TextConditioner, encoder_outputs, prompt_tokenizers,
                                          removal_keep_mask)


class LiveTextConditioner(nn.Module):
    """The module's `text` on the cache with adapted CLIP encoders: those encoders (children named
    as in `TextConditioner`) with their tokenizers on the training device; the dropout draws and
    the previews' other encoders (built on the CPU when first needed) as `CPUTextConditioner`'s."""

    def __init__(self, cfg: TextConfig, encoders: dict[str, nn.Module]):
        super().__init__()
        for name, encoder in encoders.items():
            self.add_module(name, encoder)
        tokenizers = prompt_tokenizers(cfg, *config_tokenizers(cfg))
        self.tokenizers = {name: tokenizers[name] for name in encoders}
        self.cpu = CPUTextConditioner(cfg)  # a plain object: neither moved to the device nor saved

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of the live encoders only: {"clip_l": (B, Lc), ...} on the CPU."""
        return {name: tokenizer(prompts) for name, tokenizer in self.tokenizers.items()}

    def dropout_keep_mask(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.cpu.dropout_keep_mask(batch_size, generator)

    def encode(self, prompts: list[str], without: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_with(self.cpu.conditioner(), adapted_modules(self, self.tokenizers), prompts, without)


def build_text(cfg: TrainConfig, frozen_dtype: torch.dtype) -> tuple[object, dict[str, str]]:
    """(the module's `text`, {adapted encoder: digest of its base}): a `TextConditioner` on the device,
    on the cache a `CPUTextConditioner`, or a `LiveTextConditioner` when CLIP encoders are adapted."""
    encoders, digests = adapted_text_encoders_from_config(cfg.text, cfg.adapter, cfg.model.adapter_weights,
                                                          frozen_dtype)
    if cfg.data.cached:
        return (LiveTextConditioner(cfg.text, encoders) if encoders else CPUTextConditioner(cfg.text)), digests
    return text_conditioner_from_config(cfg.text, dtype=frozen_dtype, encoders=encoders), digests


def adapted_modules(text, names: Iterable[str]) -> nn.ModuleDict:
    """The adapted encoders of `text` as one module (what their EMA copy averages)."""
    return nn.ModuleDict({name: getattr(text, name) for name in names})


def adapter_parameters(text, names: Iterable[str]) -> list[nn.Parameter]:
    """The trained parameters of `text`'s adapted encoders (their adapters), in module order."""
    return [parameter for name in names for parameter in getattr(text, name).parameters() if parameter.requires_grad]


def adapted_outputs(text, names: Iterable[str], token_ids: dict[str, torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The adapted encoders' outputs (`{name}_hidden`, `{name}_pooled`) under the caller's grad mode."""
    outputs = {}
    for name in names:
        outputs.update(encoder_outputs(name, getattr(text, name), token_ids[name].to(device)))
    return outputs


@torch.no_grad()
def encode_with(base: TextConditioner, adapted: nn.ModuleDict, prompts: list[str],
                without: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of `prompts` without dropout, the encoders in `adapted` standing in for
    `base`'s own (on whatever device they are), those `without` names removed; on `base`'s device."""
    token_ids = base.tokenize(prompts)
    outputs = base.encode_tokens(token_ids, tuple(name for name in ENCODER_NAMES if name not in adapted))
    for name, encoder in adapted.items():
        device = next(encoder.parameters()).device
        found = encoder_outputs(name, encoder, token_ids[name].to(device))
        outputs.update({key: value.to(base.device) for key, value in found.items()})
    return TextConditioner.assemble(outputs, removal_keep_mask(len(prompts), tuple(without)))


class SamplingText:
    """`text.encode` with other adapted encoders (the EMA copies), for sampling and previews."""

    def __init__(self, text, adapted: nn.ModuleDict):
        self.text, self.adapted = text, adapted

    def encode(self, prompts: list[str], without: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.text.cpu.conditioner() if isinstance(self.text, LiveTextConditioner) else self.text
        return encode_with(base, self.adapted, prompts, without)
