"""MM-DiT state-dict keys: official (Stability single-file, ours) <-> diffusers `SD3Transformer2DModel`.

Our `sd3train.model.mmdit.MMDiT` uses the official names, so an official checkpoint (keys under
`model.diffusion_model.`) loads after stripping that prefix. diffusers differs in three ways:
  - names (`joint_blocks.i.x_block` -> `transformer_blocks.i`, `t_embedder.mlp.0` ->
    `time_text_embed.timestep_embedder.linear_1`, ...);
  - the fused `attn.qkv` is split into `to_q/to_k/to_v` (image) and `add_{q,k,v}_proj` (text);
  - its `AdaLayerNormContinuous` (final `norm_out`, the last block's pre-only `norm1_context`)
    orders the modulation (scale, shift) where the official order is (shift, scale).
The mapping mirrors diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`. Both directions
refuse a state dict with missing or unexpected keys, listing them (up to ten of each).
"""

from __future__ import annotations

import re

import torch

OFFICIAL_PREFIX = "model.diffusion_model."
_PARAM_SUFFIXES = (".weight", ".bias")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # (shift, scale) <-> (scale, shift) along the output axis; its own inverse.
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _layout(num_layers: int, dual_attention_layers: set[int], qk_norm: bool):
    """The full correspondence for one architecture.

    Returns (renames, fused): renames are (official, diffusers, swap_halves) parameter names;
    fused are (official qkv name, (diffusers q, k, v names), optional) where optional marks
    biases that a model built with qkv_bias=False does not have.
    """
    renames: list[tuple[str, str, bool]] = [("pos_embed", "pos_embed.pos_embed", False)]
    fused: list[tuple[str, tuple[str, str, str], bool]] = []

    def linear(official: str, diffusers: str, swap: bool = False) -> None:
        for suffix in _PARAM_SUFFIXES:
            renames.append((official + suffix, diffusers + suffix, swap))

    def qkv(official: str, diffusers_names: tuple[str, str, str]) -> None:
        for suffix in _PARAM_SUFFIXES:
            fused.append((official + suffix, tuple(name + suffix for name in diffusers_names), suffix == ".bias"))

    linear("x_embedder.proj", "pos_embed.proj")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")

    for i in range(num_layers):
        last = i == num_layers - 1
        xb, cb, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        qkv(f"{xb}.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"))
        qkv(f"{cb}.attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"))
        if qk_norm:
            renames.append((f"{xb}.attn.ln_q.weight", f"{d}.attn.norm_q.weight", False))
            renames.append((f"{xb}.attn.ln_k.weight", f"{d}.attn.norm_k.weight", False))
            renames.append((f"{cb}.attn.ln_q.weight", f"{d}.attn.norm_added_q.weight", False))
            renames.append((f"{cb}.attn.ln_k.weight", f"{d}.attn.norm_added_k.weight", False))
        linear(f"{xb}.attn.proj", f"{d}.attn.to_out.0")
        if not last:
            linear(f"{cb}.attn.proj", f"{d}.attn.to_add_out")
        if i in dual_attention_layers:
            qkv(f"{xb}.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"))
            if qk_norm:
                renames.append((f"{xb}.attn2.ln_q.weight", f"{d}.attn2.norm_q.weight", False))
                renames.append((f"{xb}.attn2.ln_k.weight", f"{d}.attn2.norm_k.weight", False))
            linear(f"{xb}.attn2.proj", f"{d}.attn2.to_out.0")
        linear(f"{xb}.adaLN_modulation.1", f"{d}.norm1.linear")
        # The pre-only text stream uses diffusers' AdaLayerNormContinuous: (scale, shift).
        linear(f"{cb}.adaLN_modulation.1", f"{d}.norm1_context.linear", swap=last)
        linear(f"{xb}.mlp.fc1", f"{d}.ff.net.0.proj")
        linear(f"{xb}.mlp.fc2", f"{d}.ff.net.2")
        if not last:
            linear(f"{cb}.mlp.fc1", f"{d}.ff_context.net.0.proj")
            linear(f"{cb}.mlp.fc2", f"{d}.ff_context.net.2")

    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return renames, fused


def _layer_indices(state_dict: dict, pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(match.group(1)) for key in state_dict if (match := regex.match(key))}


def _listed(keys: list[str], limit: int = 10) -> str:
    # A wrong depth leaves hundreds of keys over; the first few say what happened.
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def _raise_if_problems(missing: list[str], unexpected: list[str], direction: str) -> None:
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if problems:
        raise KeyError(f"{direction}: state dict does not match the MM-DiT layout; " + "; ".join(problems))


def official_to_diffusers(state_dict: dict, num_layers: int) -> dict:
    """Official / sd3train MM-DiT keys (with or without `model.diffusion_model.`) -> diffusers keys.

    qk norm and MMDiT-X dual-attention layers are detected from the keys. Tensors are shared,
    not copied, except the split and half-swapped ones. The input is left unchanged.
    """
    source = {
        (key[len(OFFICIAL_PREFIX):] if key.startswith(OFFICIAL_PREFIX) else key): value
        for key, value in state_dict.items()
    }
    qk_norm = any(".attn.ln_q." in key for key in source)
    dual = _layer_indices(source, r"joint_blocks\.(\d+)\.x_block\.attn2\.")
    renames, fused = _layout(num_layers, dual, qk_norm)

    out, missing = {}, []
    for official, diffusers, swap in renames:
        if official not in source:
            missing.append(official)
            continue
        tensor = source.pop(official)
        out[diffusers] = _swap_halves(tensor) if swap else tensor
    for official, names, optional in fused:
        if official not in source:
            if not optional:
                missing.append(official)
            continue
        for name, part in zip(names, source.pop(official).chunk(3, dim=0)):  # q, k, v rows
            out[name] = part
    _raise_if_problems(missing, list(source), "official_to_diffusers")
    return out


def diffusers_to_official(state_dict: dict, num_layers: int) -> dict:
    """diffusers `SD3Transformer2DModel` keys -> official / sd3train MM-DiT keys (no prefix).

    The result loads into `MMDiT` with `strict=True`. The input is left unchanged.
    """
    source = dict(state_dict)
    qk_norm = any(".attn.norm_q." in key for key in source)
    dual = _layer_indices(source, r"transformer_blocks\.(\d+)\.attn2\.")
    renames, fused = _layout(num_layers, dual, qk_norm)

    out, missing = {}, []
    for official, diffusers, swap in renames:
        if diffusers not in source:
            missing.append(diffusers)
            continue
        tensor = source.pop(diffusers)
        out[official] = _swap_halves(tensor) if swap else tensor
    for official, names, optional in fused:
        present = [name in source for name in names]
        if not any(present) and optional:
            continue
        if not all(present):
            missing.extend(name for name, here in zip(names, present) if not here)
            continue
        out[official] = torch.cat([source.pop(name) for name in names], dim=0)  # (3 * D, ...) q, k, v rows
    _raise_if_problems(missing, list(source), "diffusers_to_official")
    return out


def linear_module_names(num_layers: int, dual_attention_layers: set[int]):
    """The linear layers' correspondence by module name (no `.weight`): (renamed, fused), where
    renamed maps an official module to (its diffusers module, whether its output rows swap halves)
    and fused maps an official qkv module to its diffusers q, k and v modules. For adapters, which
    attach to modules rather than to parameters."""
    renames, fused = _layout(num_layers, set(dual_attention_layers), qk_norm=False)
    suffix = ".weight"
    renamed = {official[:-len(suffix)]: (diffusers[:-len(suffix)], swap)
               for official, diffusers, swap in renames if official.endswith(suffix) and diffusers.endswith(suffix)}
    split = {official[:-len(suffix)]: tuple(name[:-len(suffix)] for name in names)
             for official, names, _ in fused if official.endswith(suffix)}
    return renamed, split
