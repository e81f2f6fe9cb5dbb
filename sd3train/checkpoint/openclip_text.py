"""OpenCLIP text-tower key names <-> transformers `CLIPTextModelWithProjection` names.

OpenCLIP (how LAION publishes bigG, `open_clip_model.safetensors`) names a CLIP text tower:
  token_embedding.weight, positional_embedding (L, D), ln_final.{weight,bias},
  text_projection (D, P), applied as x @ P: transformers' `text_projection.weight` (P, D) is its transpose,
  transformer.resblocks.N.{ln_1, attn.in_proj_{weight,bias}, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
  in_proj stacking q, k, v on dim 0 (nn.MultiheadAttention).
Full CLIP checkpoints also hold `visual.*`, `logit_scale` (and `logit_bias`): callers skip those.
`CustomTextCLIP` models put the tower under `text.`: callers strip that prefix first.

    from sd3train.checkpoint.openclip_text import transformers_from_openclip
    state = transformers_from_openclip(open_clip_state, "bigG.safetensors")
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from sd3train.checkpoint.errors import CheckpointError

# Keys of a full OpenCLIP checkpoint that are not the text tower.
OPENCLIP_NON_TEXT = ("visual.", "logit_scale", "logit_bias", "attn_mask")
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")
# (transformers suffix, OpenCLIP suffix) inside one layer, besides the stacked q/k/v.
_LAYER_RENAMES = (
    ("layer_norm1", "ln_1"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_QKV = ("q_proj", "k_proj", "v_proj")
_TOP_RENAMES = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
)


def is_openclip_text(keys) -> bool:
    """Whether `keys` (any prefix already removed) name an OpenCLIP text tower."""
    keys = list(keys)
    return "token_embedding.weight" in keys and any(_BLOCK.match(key) for key in keys)


def transformers_from_openclip(
    state: Mapping[str, torch.Tensor], source: str, what: str = "OpenCLIP text encoder", key_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection names for an OpenCLIP text tower (no non-text keys).

    Strict: a missing or unknown key fails naming it as the file stores it (`key_prefix` + key).
    Without `text_projection` (proj_type 'none') the result has no `text_projection.weight`.
    """
    remaining = dict(state)

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise CheckpointError(f"{what} weights in {source}: missing key {key_prefix + key!r}")
        return remaining.pop(key)

    if "text_projection.bias" in remaining:
        raise CheckpointError(
            f"{what} weights in {source}: a text projection with a bias ({key_prefix}text_projection.bias) "
            "has no place in transformers' CLIPTextModelWithProjection"
        )
    out = {ours: take(theirs) for ours, theirs in _TOP_RENAMES}
    if "text_projection" in remaining:
        out["text_projection.weight"] = take("text_projection").T.contiguous()  # (P, D)
    # Without any block this asks for block 0, so the error names a key the file lacks.
    depth = max((int(match.group(1)) for key in state if (match := _BLOCK.match(key))), default=0) + 1
    for index in range(depth):
        block, layer = f"transformer.resblocks.{index}.", f"text_model.encoder.layers.{index}."
        for kind in ("weight", "bias"):
            # (3 D, ...) -> three (D, ...); cloned so each parameter owns its storage (safetensors
            # refuses to save tensors sharing memory).
            stacked = take(f"{block}attn.in_proj_{kind}")
            for projection, part in zip(_QKV, stacked.chunk(3, dim=0)):
                out[f"{layer}self_attn.{projection}.{kind}"] = part.clone()
            for ours, theirs in _LAYER_RENAMES:
                out[f"{layer}{ours}.{kind}"] = take(f"{block}{theirs}.{kind}")
    if remaining:
        first = sorted(remaining)[0]
        raise CheckpointError(
            f"{what} weights in {source} do not match an OpenCLIP text tower: {len(remaining)} unexpected "
            f"key(s), first {key_prefix + first!r}"
        )
    return out


def openclip_from_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse: OpenCLIP text-tower names for transformers CLIPTextModelWithProjection weights."""
    out = {theirs: state[ours] for ours, theirs in _TOP_RENAMES}
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()  # (D, P)
    layer_pattern = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
    depth = max(int(match.group(1)) for key in state if (match := layer_pattern.match(key))) + 1
    for index in range(depth):
        block, layer = f"transformer.resblocks.{index}.", f"text_model.encoder.layers.{index}."
        for kind in ("weight", "bias"):
            parts = [state[f"{layer}self_attn.{projection}.{kind}"] for projection in _QKV]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)  # (3 D, ...)
            for ours, theirs in _LAYER_RENAMES:
                out[f"{block}{theirs}.{kind}"] = state[f"{layer}{ours}.{kind}"]
    return out
