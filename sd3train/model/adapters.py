"""LoRA-family adapters on the MM-DiT's linear layers, with the `peft` library.

    names = adapter_targets(model, ["attention", "mlp"], blocks=[0, 1])
    add_adapter(model, "lora", names, rank=16, alpha=16)          # base weights frozen, adapters trainable
    adapter_state_dict(model)   # {"joint_blocks.0.x_block.attn.qkv.lora_A.weight": ..., ...}

Targets are named groups of the joint blocks' linear layers, or explicit regular expressions over
module names (full match):
  attention       each stream's attention qkv and output projection (attn and SD3.5-Medium's attn2)
  mlp             each stream's MLP (fc1, fc2)
  modulation      each stream's adaLN modulation
  context_stream  every linear layer of the text stream (context_block)
`blocks` picks joint blocks by index (None: all). The CLIP-L and bigG text encoders
(`adapter.text_encoders`) take the same kind, rank and alpha on their attention projections
(`text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`, diffusers' `text_encoder_lora_layers`
default): `apply_text_adapter_config(clip_l, cfg)`. Kinds: lora, dora (LoRA with a learned weight
magnitude), loha and lokr (Hadamard and Kronecker products, LyCORIS). peft wraps each target in a
layer holding the original as `base_layer`, so base parameters are renamed (`...qkv.base_layer.weight`);
`adapter_state_dict` and `base_state_dict` give both in the MM-DiT's own names.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Optional, Sequence

import torch
from torch import nn

ADAPTER_KINDS = ("lora", "dora", "loha", "lokr")
TARGET_GROUPS = {
    "attention": r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)",
    "mlp": r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)",
    "modulation": r"joint_blocks\.\d+\.(x_block|context_block)\.adaLN_modulation\.1",
    "context_stream": r"joint_blocks\.\d+\.context_block\..+",
}
# transformers' CLIPTextModelWithProjection module names (full match).
TEXT_ENCODER_TARGET = r"text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"
ADAPTER_NAME = "default"  # peft's name for the one adapter we train
_PEFT_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+|hada_[A-Za-z0-9_]+|lokr_[A-Za-z0-9_]+)\.default(?=\.|$)")


def adapter_targets(model: nn.Module, targets: Sequence[str], blocks: Optional[Sequence[int]] = None) -> list[str]:
    """Names of `model`'s nn.Linear modules that `targets` (group names or regular expressions)
    select, within the joint blocks `blocks` (None: all), in module order. A target that selects
    nothing is an error naming it."""
    patterns = [TARGET_GROUPS.get(target, target) for target in targets]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if blocks is not None:
        wanted = {int(index) for index in blocks}
        linears = [name for name in linears
                   if (match := re.match(r"joint_blocks\.(\d+)\.", name)) and int(match.group(1)) in wanted]
    chosen: list[str] = []
    for target, pattern in zip(targets, patterns):
        hits = [name for name in linears if re.fullmatch(pattern, name)]
        if not hits:
            raise ValueError(f"adapter.targets: {target!r} selects no linear layer of the MM-DiT"
                             + (f" in blocks {sorted(set(blocks))}" if blocks is not None else ""))
        chosen += [name for name in hits if name not in chosen]
    return [name for name in linears if name in chosen]


def peft_config(kind: str, names: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
                init: str | bool = True):
    """The peft config for `kind` over exactly the modules `names`."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    target = "|".join(re.escape(name) for name in names)  # peft full-matches a string target
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                          init_lora_weights=init, use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=target, init_weights=init)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=target, init_weights=init)
    raise ValueError(f"adapter.kind: {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")


def add_adapter(model: nn.Module, kind: str, names: Sequence[str], rank: int, alpha: float,
                dropout: float = 0.0, init: str | bool = True) -> nn.Module:
    """Wrap the modules `names` of `model` in `kind` adapters, in place; every other parameter
    (the base) is frozen. Returns `model`."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(kind, names, rank, alpha, dropout, init), model, adapter_name=ADAPTER_NAME)
    return train_adapters_only(model)


def train_adapters_only(model: nn.Module) -> nn.Module:
    """Adapter parameters trainable, every other one frozen; returns `model`."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))
    return model


def is_adapter_key(name: str) -> bool:
    return _PEFT_SEGMENT.search(name) is not None


def our_name(peft_name: str) -> str:
    """A peft parameter name in the MM-DiT's own names: the adapter's name and the base layer's
    wrapper dropped (`...qkv.lora_A.default.weight` -> `...qkv.lora_A.weight`,
    `...qkv.base_layer.weight` -> `...qkv.weight`)."""
    return _PEFT_SEGMENT.sub(lambda match: "." + match.group(1), peft_name).replace(".base_layer.", ".")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, in the MM-DiT's names (`joint_blocks.0.x_block.attn.qkv.lora_A.weight`)."""
    return {our_name(name): value for name, value in model.state_dict().items() if is_adapter_key(name)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their names without adapters (what the unadapted MM-DiT's state dict has)."""
    return {our_name(name): value for name, value in model.state_dict().items() if not is_adapter_key(name)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights in our names into an adapted `model`; missing or unexpected keys are an
    error listing them."""
    ours = {our_name(name): name for name in model.state_dict() if is_adapter_key(name)}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise KeyError(f"adapter weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict({ours[name]: value for name, value in state.items()}, strict=False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights with the adapters merged in, in the unadapted MM-DiT's names, by peft's own
    merge (LoRA's W + (alpha / r) B A, DoRA's rescaled sum, LoHa's and LoKr's products) on a copy;
    `model` is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
    return base_state_dict(merged)


def apply_adapter_config(model: nn.Module, cfg) -> nn.Module:
    """`add_adapter` as an `AdapterConfig` (sd3train.config.schema) says; returns `model`."""
    names = adapter_targets(model, cfg.targets, cfg.blocks)
    return add_adapter(model, cfg.kind, names, cfg.rank, cfg.alpha, cfg.dropout,
                       init=True if cfg.init == "default" else cfg.init)


def text_adapter_targets(encoder: nn.Module) -> list[str]:
    """The attention projections of a CLIP text encoder (`TEXT_ENCODER_TARGET`), in module order."""
    names = [name for name, module in encoder.named_modules()
             if isinstance(module, nn.Linear) and re.fullmatch(TEXT_ENCODER_TARGET, name)]
    if not names:
        raise ValueError("adapter.text_encoders: the encoder has no text_model.encoder.layers.N.self_attn.*_proj "
                         "layers (not a transformers CLIPTextModelWithProjection)")
    return names


def apply_text_adapter_config(encoder: nn.Module, cfg) -> nn.Module:
    """`add_adapter` on a CLIP text encoder's attention projections, with the kind, rank, alpha,
    dropout and init of the MM-DiT's adapter (`AdapterConfig`); returns `encoder`."""
    return add_adapter(encoder, cfg.kind, text_adapter_targets(encoder), cfg.rank, cfg.alpha, cfg.dropout,
                       init=True if cfg.init == "default" else cfg.init)


def set_adapter_training(model: nn.Module, mode: bool) -> None:
    """Switch the adapter layers alone (their dropout) to `mode`, in a model otherwise kept in eval
    mode (the frozen text encoders)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.train(mode)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and bytes (BLAKE2b), which identifies the
    base weights an adapter was trained on whatever file they came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
