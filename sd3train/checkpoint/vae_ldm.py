"""VAE state-dict keys: LDM / Stability single-file names <-> diffusers `AutoencoderKL` names (ours).

Stability's single files keep the VAE under `first_stage_model.` with the original LDM names
(`encoder.down.0.block.1.nin_shortcut`, `decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`);
our `sd3train.model.vae.VAE` uses diffusers' names. Besides renaming:
  - the decoder's levels are numbered from the lowest resolution in diffusers (`up_blocks.0`)
    and from the highest in LDM (`up.0`);
  - the mid-block attention projections are 1x1 convolutions in LDM, (C, C, 1, 1), and Linears
    in diffusers, (C, C).
Both directions refuse unknown or missing keys, naming the first of each.
"""

from __future__ import annotations

import re

from sd3train.checkpoint.errors import CheckpointError, key_mismatch

_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2")
_ATTENTION_PARTS = (("norm", "group_norm", False), ("q", "to_q", True), ("k", "to_k", True),
                    ("v", "to_v", True), ("proj_out", "to_out.0", True))
_SUFFIXES = (".weight", ".bias")


def _layout(num_levels: int, layers_per_block: int) -> list[tuple[str, str, bool, bool]]:
    """(ldm name, diffusers name, is a 1x1-conv projection, optional) for every parameter."""
    pairs: list[tuple[str, str, bool, bool]] = []

    def param(ldm: str, diffusers: str, projection: bool = False, optional: bool = False) -> None:
        for suffix in _SUFFIXES:
            pairs.append((ldm + suffix, diffusers + suffix, projection and suffix == ".weight", optional))

    def resnet(ldm: str, diffusers: str) -> None:
        for part in _RESNET_PARTS:
            param(f"{ldm}.{part}", f"{diffusers}.{part}")
        # Only where the width changes.
        param(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut", optional=True)

    def mid(side: str) -> None:
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        for ldm, diffusers, projection in _ATTENTION_PARTS:
            param(f"{side}.mid.attn_1.{ldm}", f"{side}.mid_block.attentions.0.{diffusers}", projection)
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")

    last = num_levels - 1
    # Same names in both layouts; only SD1/SDXL-style autoencoders have them.
    param("quant_conv", "quant_conv", optional=True)
    param("post_quant_conv", "post_quant_conv", optional=True)
    for side in ("encoder", "decoder"):
        param(f"{side}.conv_in", f"{side}.conv_in")
        param(f"{side}.norm_out", f"{side}.conv_norm_out")
        param(f"{side}.conv_out", f"{side}.conv_out")
        mid(side)
    for level in range(num_levels):
        for index in range(layers_per_block):
            resnet(f"encoder.down.{level}.block.{index}", f"encoder.down_blocks.{level}.resnets.{index}")
        if level < last:
            param(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
    for block in range(num_levels):
        level = last - block  # LDM counts decoder levels from the top resolution
        for index in range(layers_per_block + 1):  # the decoder has one resnet more per level
            resnet(f"decoder.up.{level}.block.{index}", f"decoder.up_blocks.{block}.resnets.{index}")
        if block < last:
            param(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{block}.upsamplers.0.conv")
    return pairs


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(match.group(1)) for key in keys if (match := regex.match(key))}
    return max(found) + 1 if found else 0


def _convert(state: dict, pairs, source_is_ldm: bool, direction: str, key_prefix: str) -> dict:
    source = dict(state)
    out, missing = {}, []
    for ldm, diffusers, projection, optional in pairs:
        name_in, name_out = (ldm, diffusers) if source_is_ldm else (diffusers, ldm)
        if name_in not in source:
            if not optional:
                missing.append(name_in)
            continue
        tensor = source.pop(name_in)
        if projection:
            # (C, C, 1, 1) conv <-> (C, C) linear
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1]) if source_is_ldm else tensor[:, :, None, None]
        out[name_out] = tensor
    if missing or source:
        raise CheckpointError(
            f"{direction}: VAE state dict does not match the AutoencoderKL layout: "
            + key_mismatch([key_prefix + key for key in missing], [key_prefix + key for key in source])
        )
    return out


def ldm_to_diffusers(state: dict, key_prefix: str = "") -> dict:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers keys. The input is left unchanged.

    `key_prefix` only goes into error messages (keys named as the file stores them).
    """
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    layers = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    return _convert(state, _layout(levels, layers), True, "ldm_to_diffusers", key_prefix)


def diffusers_to_ldm(state: dict) -> dict:
    """diffusers / sd3train VAE keys -> LDM keys (without prefix). The input is left unchanged."""
    levels = _count(state, r"encoder\.down_blocks\.(\d+)\.")
    layers = _count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return _convert(state, _layout(levels, layers), False, "diffusers_to_ldm", "")
