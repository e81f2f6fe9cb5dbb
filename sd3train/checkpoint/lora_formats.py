"""LoRA weights of the MM-DiT and of the CLIP text encoders in the layouts other tools load, and back.

Ours (`sd3train.model.adapters.adapter_state_dict`): `joint_blocks.0.x_block.attn.qkv.lora_A.weight`
(rank x in) and `.lora_B.weight` (out x rank) per adapted module, scaled by alpha / rank.

kohya sd-scripts / ComfyUI: the module name with dots as underscores under `lora_unet_`,
`lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`
(a 0-dim tensor); ComfyUI applies up @ down x alpha / rank. Our MM-DiT uses Stability's module
names, so the mapping is one to one.

diffusers (`StableDiffusion3Pipeline.load_lora_weights`): `transformer.<diffusers module>.lora_A.weight`
and `.lora_B.weight`, with the module names of `SD3Transformer2DModel`. The fused qkv becomes q, k
and v: B splits by rows, A is shared, which is exact. diffusers reads no alpha from these keys
(scale 1), so alpha / rank is folded into B. The last block's pre-only text modulation orders its
output rows (scale, shift) where ours are (shift, scale): B's halves swap.

Text encoders (`adapter.text_encoders`): their modules are transformers' CLIPTextModelWithProjection's
in every layout. kohya: `lora_te1_` (CLIP-L), `lora_te2_` (bigG; `lora_te3_` is T5, which we do not
adapt) + the module path with dots as underscores, as sd-scripts' lora_sd3.py names them
(`lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight`). diffusers:
`text_encoder.` (CLIP-L) and `text_encoder_2.` (bigG) + the module path + `.lora_A.weight` /
`.lora_B.weight` (alpha / rank folded into B), what `SD3LoraLoaderMixin.load_lora_into_text_encoder` reads.

    write = lora_to_kohya(adapter, alpha=16.0)
    adapter, alpha = lora_from_kohya(write, module_names)
    lora_to_diffusers(adapter, alpha=16.0, rank=16, num_layers=24, dual_attention_layers=set())
    text_lora_to_diffusers(clip_l_adapter, "clip_l", alpha=16.0, rank=16)   # text_encoder.text_model...
    read_lora_file(path, ...); read_text_lora_file(path, "clip_l", ...)       # model.adapter_weights, either layout
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from sd3train.checkpoint.mmdit_diffusers import _swap_halves, linear_module_names

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
TEXT_KOHYA_PREFIXES = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5": "lora_te3_"}
TEXT_DIFFUSERS_PREFIXES = {"clip_l": "text_encoder.", "clip_g": "text_encoder_2.", "t5": "text_encoder_3."}
_OURS = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


def lora_modules(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of a plain LoRA state dict in our names; anything else is an error (DoRA's
    magnitudes, LoHa's and LoKr's factors have no place in these layouts)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        match = _OURS.match(key)
        if match is None:
            raise ValueError(f"{key}: only plain LoRA (A and B) exports to the kohya and diffusers layouts; "
                             "merge other adapter kinds into the base instead (merge=true)")
        parts.setdefault(match.group("module"), {})[match.group("part")] = value
    incomplete = sorted(module for module, found in parts.items() if set(found) != {"A", "B"})
    if incomplete:
        raise ValueError(f"LoRA modules without both A and B: {incomplete[:10]}")
    return {module: (found["A"], found["B"]) for module, found in parts.items()}


def kohya_module_name(module: str, prefix: str = KOHYA_PREFIX) -> str:
    return prefix + module.replace(".", "_")


def lora_to_kohya(adapter: dict[str, torch.Tensor], alpha: float, prefix: str = KOHYA_PREFIX) -> dict[str, torch.Tensor]:
    """`prefix`: lora_unet_ for the MM-DiT, TEXT_KOHYA_PREFIXES[name] for a text encoder's adapter."""
    out = {}
    for module, (down, up) in lora_modules(adapter).items():
        name = kohya_module_name(module, prefix)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def lora_from_kohya(state: dict[str, torch.Tensor], module_names: Iterable[str],
                    alpha: float | None = None, prefix: str = KOHYA_PREFIX) -> tuple[dict[str, torch.Tensor], float]:
    """A kohya/ComfyUI LoRA in our names, for a model whose linear modules are `module_names`;
    returns (adapter, alpha). Per-module alphas other than `alpha` (default: the first module's)
    are folded into B, so one alpha serves the whole adapter exactly as the file specified."""
    by_kohya = {kohya_module_name(name, prefix): name for name in module_names}
    adapter: dict[str, torch.Tensor] = {}
    unknown = [key for key in state if key.partition(".")[0] not in by_kohya
               or key.partition(".")[2] not in ("lora_down.weight", "lora_up.weight", "alpha")]
    if unknown:
        raise KeyError(f"kohya LoRA keys that name no module of this model: {sorted(unknown)[:10]}")
    names = sorted({key.partition(".")[0] for key in state})
    for name in names:
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        module_alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        if alpha is None:
            alpha = module_alpha
        scale = module_alpha / alpha  # both over the same rank
        adapter[f"{by_kohya[name]}.lora_A.weight"] = down
        adapter[f"{by_kohya[name]}.lora_B.weight"] = up if scale == 1.0 else up * scale
    return adapter, float(alpha)


def lora_to_diffusers(adapter: dict[str, torch.Tensor], alpha: float, rank: int, num_layers: int,
                      dual_attention_layers: Iterable[int] = ()) -> dict[str, torch.Tensor]:
    renamed, split = linear_module_names(num_layers, set(dual_attention_layers))
    scale = alpha / rank
    out = {}
    for module, (down, up) in lora_modules(adapter).items():
        up = up * scale
        if module in split:
            for name, rows in zip(split[module], up.chunk(3, dim=0)):  # q, k, v output rows
                out[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = down.clone()
                out[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = rows.contiguous()
        elif module in renamed:
            name, swap = renamed[module]
            out[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = down.contiguous()
            out[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = (_swap_halves(up) if swap else up).contiguous()
        else:
            raise KeyError(f"{module}: no diffusers counterpart for this adapted module")
    return out


def lora_from_diffusers(state: dict[str, torch.Tensor], alpha: float, rank: int, num_layers: int,
                        dual_attention_layers: Iterable[int] = ()) -> dict[str, torch.Tensor]:
    """A diffusers-layout SD3 LoRA (scale 1) in our names, for an adapter of `rank` and `alpha`.
    q, k and v adapters that share A (ours always do) become one qkv adapter of that rank; others
    are refused (their fused form would need rank 3r)."""
    renamed, split = linear_module_names(num_layers, set(dual_attention_layers))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.match(rf"^{re.escape(DIFFUSERS_PREFIX)}(?P<module>.+)\.lora_(?P<part>A|B)\.weight$", key)
        if match is None:
            raise KeyError(f"{key}: not a diffusers transformer LoRA key")
        pairs.setdefault(match.group("module"), {})[match.group("part")] = value
    unscale = rank / alpha
    adapter: dict[str, torch.Tensor] = {}
    for module, names in split.items():
        if not any(name in pairs for name in names):
            continue
        missing = [name for name in names if name not in pairs]
        if missing:
            raise KeyError(f"{module}: the diffusers LoRA adapts some of q, k, v but not {missing}")
        downs = [pairs[name]["A"] for name in names]
        if not all(torch.equal(downs[0], down) for down in downs[1:]):
            raise ValueError(f"{module}: q, k and v adapters with different A cannot be one rank-{rank} qkv adapter")
        adapter[f"{module}.lora_A.weight"] = downs[0]
        adapter[f"{module}.lora_B.weight"] = torch.cat([pairs.pop(name)["B"] for name in names], dim=0) * unscale
    for module, (name, swap) in renamed.items():
        if name in pairs:
            found = pairs.pop(name)
            up = found["B"] * unscale
            adapter[f"{module}.lora_A.weight"] = found["A"]
            adapter[f"{module}.lora_B.weight"] = _swap_halves(up) if swap else up
    if pairs:
        raise KeyError(f"diffusers LoRA modules with no counterpart in this MM-DiT: {sorted(pairs)[:10]}")
    return adapter


def text_lora_to_diffusers(adapter: dict[str, torch.Tensor], name: str, alpha: float,
                           rank: int) -> dict[str, torch.Tensor]:
    """A text encoder's LoRA (our names, transformers' module paths) under diffusers' `text_encoder.` /
    `text_encoder_2.` prefix, alpha / rank folded into B (diffusers reads no alpha)."""
    prefix, scale = TEXT_DIFFUSERS_PREFIXES[name], alpha / rank
    out = {}
    for module, (down, up) in lora_modules(adapter).items():
        out[f"{prefix}{module}.lora_A.weight"] = down.contiguous()
        out[f"{prefix}{module}.lora_B.weight"] = (up * scale).contiguous()
    return out


def text_lora_from_diffusers(state: dict[str, torch.Tensor], name: str, alpha: float,
                             rank: int) -> dict[str, torch.Tensor]:
    """The inverse of `text_lora_to_diffusers` for the keys of `state` under `name`'s prefix. Paths
    without `text_model.` (diffusers' flattened CLIPTextModel) get it back."""
    prefix, unscale = TEXT_DIFFUSERS_PREFIXES[name], rank / alpha
    adapter = {}
    for key, value in state.items():
        match = re.match(rf"^{re.escape(prefix)}(?P<module>.+)\.lora_(?P<part>A|B)\.weight$", key)
        if match is None:
            raise KeyError(f"{key}: not a diffusers text encoder LoRA key (<module>.lora_A/B.weight)")
        module = match.group("module")
        module = module if module.startswith("text_model.") else "text_model." + module
        adapter[f"{module}.lora_{match.group('part')}.weight"] = value if match.group("part") == "A" else value * unscale
    return adapter


def lora_file_parts(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """("kohya" | "diffusers", {"mmdit" | "clip_l" | "clip_g" | "t5": that part's keys}) of a LoRA
    file's tensors, told apart by their prefixes; a key of neither layout is an error."""
    layouts = {"kohya": {"mmdit": KOHYA_PREFIX, **TEXT_KOHYA_PREFIXES},
               "diffusers": {"mmdit": DIFFUSERS_PREFIX, **TEXT_DIFFUSERS_PREFIXES}}
    for layout, prefixes in layouts.items():
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            part = next((part for part, prefix in prefixes.items() if key.startswith(prefix)), None)
            if part is None:
                break
            parts.setdefault(part, {})[key] = value
        else:
            return layout, parts
    raise KeyError("neither the kohya (lora_unet_*, lora_te1_*, lora_te2_*) nor the diffusers (transformer.*, "
                   "text_encoder.*, text_encoder_2.*) layout")


def _read_parts(path, text_encoders: Iterable[str] | None = None) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The file's layout and parts; parts of text encoders not in `text_encoders` (None: any) are an error."""
    from pathlib import Path

    from sd3train.checkpoint.files import read_safetensors

    layout, parts = lora_file_parts(read_safetensors(Path(path), dtype=torch.float32))
    unadapted = sorted(set(parts) - {"mmdit", *text_encoders}) if text_encoders is not None else []
    if unadapted:
        raise KeyError(f"the file adapts the text encoders {unadapted}, which adapter.text_encoders="
                       f"{list(text_encoders)} does not (T5 never takes an adapter)")
    return layout, parts


def _check_rank(adapter: dict[str, torch.Tensor], rank: int, path) -> dict[str, torch.Tensor]:
    from sd3train.checkpoint.errors import CheckpointError

    ranks = {value.shape[0] for key, value in adapter.items() if key.endswith(".lora_A.weight")}
    if ranks - {rank}:
        raise CheckpointError(f"model.adapter_weights={path}: rank {sorted(ranks)}, the config's adapter.rank is {rank}")
    return adapter


def read_lora_file(path, module_names: Iterable[str], alpha: float, rank: int, num_layers: int,
                   dual_attention_layers: Iterable[int] = (), text_encoders: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The MM-DiT part of a LoRA .safetensors in the kohya or diffusers layout (told apart by its
    keys), as adapter weights in our names for an adapter of `rank` and `alpha`. Text encoder keys
    are read by `read_text_lora_file`; those of encoders not in `text_encoders` are an error."""
    from sd3train.checkpoint.errors import CheckpointError

    try:
        layout, parts = _read_parts(path, tuple(text_encoders))
        state = parts.get("mmdit", {})
        if layout == "kohya":
            adapter, _ = lora_from_kohya(state, module_names, alpha=alpha)
        else:
            adapter = lora_from_diffusers(state, alpha, rank, num_layers, dual_attention_layers)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"model.adapter_weights={path}: {error}") from error
    return _check_rank(adapter, rank, path)


def read_text_lora_file(path, name: str, module_names: Iterable[str], alpha: float,
                        rank: int) -> dict[str, torch.Tensor]:
    """Text encoder `name`'s part of a LoRA .safetensors (either layout), in our names (the encoder's
    module paths); a file without it is an error (the config adapts that encoder)."""
    from sd3train.checkpoint.errors import CheckpointError

    try:
        layout, parts = _read_parts(path)  # the other parts are read_lora_file's to check
        if name not in parts:
            raise KeyError(f"no {name} keys ({TEXT_KOHYA_PREFIXES[name]}* or {TEXT_DIFFUSERS_PREFIXES[name]}*), "
                           f"but adapter.text_encoders adapts {name}")
        if layout == "kohya":
            adapter, _ = lora_from_kohya(parts[name], module_names, alpha=alpha, prefix=TEXT_KOHYA_PREFIXES[name])
        else:
            adapter = text_lora_from_diffusers(parts[name], name, alpha, rank)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"model.adapter_weights={path}: {error}") from error
    return _check_rank(adapter, rank, path)
