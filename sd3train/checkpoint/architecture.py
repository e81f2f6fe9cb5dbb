"""Architectures read off weights (and off diffusers config.json files where there is one).

Weights fix almost everything: depth, widths, patch size, qk norm, MMDiT-X layers, position table
size, VAE levels. What no tensor shape tells, and the value assumed when nothing else says:
  - MM-DiT head count: hidden / 64 (every released SD3 model has head dim 64);
  - MM-DiT sample_size: read off the sin-cos position table's spacing, else 128;
  - VAE norm_num_groups: 32; VAE shift/scaling factors: SD3's 0.0609 / 1.5305;
  - CLIP head count: hidden / 64; CLIP activations: quick_gelu (CLIP-L) and gelu (bigG), as in SD3;
  - T5 relative_attention_max_distance: 128.
A config.json, our training config or the metadata of our own exports overrides these.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from transformers import CLIPTextConfig, T5Config

from sd3train.checkpoint.errors import CheckpointError
from sd3train.config.schema import ModelConfig, VAEConfig
from sd3train.model.tokenizers import CLIP_BOS_ID, CLIP_EOS_ID

HEAD_DIM = 64
DEFAULT_SAMPLE_SIZE = 128
DEFAULT_NORM_GROUPS = 32
# SD3's encoders: CLIP-L uses OpenAI's quick_gelu, OpenCLIP bigG the exact gelu.
CLIP_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_g": "gelu"}
# diffusers spells RMS qk norm "rms_norm"; ours is "rms".
_DIFFUSERS_QK_NORMS = {None: None, "rms_norm": "rms"}


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(match.group(1)) for key in keys if (match := regex.match(key))})


class _Reader:
    """Shapes of named tensors; a missing one is named as the file stores it (with its prefix)."""

    def __init__(self, state: Mapping[str, torch.Tensor], source: str, what: str, key_prefix: str):
        self.state, self.source, self.what, self.key_prefix = state, source, what, key_prefix

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            raise CheckpointError(f"{self.what} weights in {self.source}: missing key {self.key_prefix + key!r}")
        return tuple(self.state[key].shape)


def _heads(hidden: int, source: str, what: str) -> int:
    if hidden % HEAD_DIM:
        raise CheckpointError(
            f"cannot tell the attention head count of the {what} in {source}: width {hidden} is not a "
            f"multiple of {HEAD_DIM} and no config says; load it from a folder with config.json"
        )
    return hidden // HEAD_DIM


def sample_size_from_pos_embed(table: torch.Tensor, patch_size: int) -> int | None:
    """The `sample_size` a (1, M*M, D) sin-cos table was built for, or None if it is not such a table.

    Row 0's tokens are columns j = 0..M-1 at positions j * base_size / M. Channels 0 and D/4 hold
    sin and cos of the position at frequency 1, so their phase grows by base_size / M per column;
    a least-squares slope over all M columns stays accurate for bf16 tables.
    """
    if table.dim() != 3 or table.shape[1] < 4 or table.shape[2] % 4 or table.is_meta:
        return None
    max_size = math.isqrt(table.shape[1])
    quarter = table.shape[2] // 4
    row = table[0, :max_size].double()  # (M, D) row 0 of the grid
    phase = torch.atan2(row[:, 0], row[:, quarter])  # (M,)
    wrapped = torch.remainder(phase.diff() + math.pi, 2 * math.pi) - math.pi  # steps below pi
    unwrapped = torch.cat([phase[:1], phase[:1] + wrapped.cumsum(0)])
    columns = torch.arange(max_size, dtype=torch.float64)
    step = float((columns * unwrapped).sum() / (columns * columns).sum())
    base = step * max_size
    if round(base) < 1 or abs(base - round(base)) > 0.05 or float((unwrapped - columns * step).abs().max()) > 0.05:
        return None  # not a sin-cos table (learned, or random)
    return round(base) * patch_size


def mmdit_config_from_weights(
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    num_heads: int | None = None,
    sample_size: int | None = None,
    key_prefix: str = "",
) -> ModelConfig:
    """ModelConfig of an official-named MM-DiT state dict (no `model.diffusion_model.` prefix)."""
    what = "MM-DiT"
    shape = _Reader(state, source, what, key_prefix).shape
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth_indices = _indices(state, r"joint_blocks\.(\d+)\.")
    if not depth_indices:
        raise CheckpointError(f"{what} weights in {source}: no joint_blocks.* keys")
    depth = depth_indices[-1] + 1
    table_shape = shape("pos_embed")
    max_size = math.isqrt(table_shape[1])
    if max_size * max_size != table_shape[1]:
        raise CheckpointError(f"{what} weights in {source}: pos_embed has {table_shape[1]} rows, not a square grid")
    if any(key.endswith(("attn.ln_q.bias", "attn.ln_k.bias")) for key in state):
        raise CheckpointError(f"{what} weights in {source}: LayerNorm qk norm (with bias) is not supported, only RMS")
    qk_norm = "rms" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None
    if sample_size is None:
        sample_size = sample_size_from_pos_embed(state["pos_embed"], patch) or DEFAULT_SAMPLE_SIZE
    return ModelConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads if num_heads is not None else _heads(hidden, source, what),
        patch_size=patch,
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0] // (patch * patch),
        mlp_ratio=shape("joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
        context_dim=shape("context_embedder.weight")[1],
        pooled_dim=shape("y_embedder.mlp.0.weight")[1],
        pos_embed_max_size=max_size,
        sample_size=sample_size,
        qk_norm=qk_norm,
        dual_attention_layers=_indices(state, r"joint_blocks\.(\d+)\.x_block\.attn2\."),
        qkv_bias="joint_blocks.0.x_block.attn.qkv.bias" in state,
    )


def mmdit_config_from_diffusers(config: Mapping, source: str) -> ModelConfig:
    """ModelConfig from a diffusers `SD3Transformer2DModel` config.json."""
    if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise CheckpointError(f"{source} holds a {config['_class_name']}, not an SD3Transformer2DModel")
    qk_norm = config.get("qk_norm")
    if qk_norm not in _DIFFUSERS_QK_NORMS:
        raise CheckpointError(f"{source}: qk_norm {qk_norm!r} is not supported (only null or 'rms_norm')")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("caption_projection_dim", hidden) != hidden:
        raise CheckpointError(
            f"{source}: caption_projection_dim {config['caption_projection_dim']} differs from the width {hidden}"
        )
    return ModelConfig(
        depth=config["num_layers"],
        hidden_size=hidden,
        num_heads=config["num_attention_heads"],
        patch_size=config.get("patch_size", 2),
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels"),
        context_dim=config.get("joint_attention_dim", 4096),
        pooled_dim=config.get("pooled_projection_dim", 2048),
        pos_embed_max_size=config["pos_embed_max_size"],
        sample_size=config.get("sample_size", DEFAULT_SAMPLE_SIZE),
        qk_norm=_DIFFUSERS_QK_NORMS[qk_norm],
        dual_attention_layers=list(config.get("dual_attention_layers") or []),
    )


def vae_config_from_weights(
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    norm_num_groups: int | None = None,
    shift_factor: float | None = None,
    scaling_factor: float | None = None,
    key_prefix: str = "",
) -> VAEConfig:
    """VAEConfig of a diffusers-named VAE state dict; what weights cannot tell from the arguments or SD3."""
    what = "VAE"
    shape = _Reader(state, source, what, key_prefix).shape
    levels = _indices(state, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"{what} weights in {source}: no encoder.down_blocks.* keys")
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in levels]
    groups = norm_num_groups or DEFAULT_NORM_GROUPS
    if any(width % groups for width in widths):
        raise CheckpointError(
            f"{what} weights in {source}: widths {widths} are not divisible by {groups} norm groups; "
            "load it from a folder whose config.json gives norm_num_groups"
        )
    defaults = VAEConfig()
    return VAEConfig(
        latent_channels=shape("encoder.conv_out.weight")[0] // 2,
        in_channels=shape("encoder.conv_in.weight")[1],
        block_out_channels=widths,
        layers_per_block=len(_indices(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        norm_num_groups=groups,
        shift_factor=defaults.shift_factor if shift_factor is None else shift_factor,
        scaling_factor=defaults.scaling_factor if scaling_factor is None else scaling_factor,
        use_quant_conv="quant_conv.weight" in state,
    )


def vae_config_from_diffusers(
    config: Mapping, source: str, weights: Mapping[str, torch.Tensor] | None = None
) -> VAEConfig:
    """VAEConfig from a diffusers `AutoencoderKL` config.json.

    Quant convs: as the config says; a config that does not say (older files) is read off `weights`.
    """
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{source} holds a {config['_class_name']}, not an AutoencoderKL")
    unsupported = []
    quant = {config.get(key) for key in ("use_quant_conv", "use_post_quant_conv")} - {None}
    if len(quant) > 1:
        unsupported.append("a quant conv without a post-quant conv (or the reverse)")
    use_quant_conv = quant.pop() if quant else weights is not None and "quant_conv.weight" in weights
    if not config.get("mid_block_add_attention", True):
        unsupported.append("a mid block without attention")
    if config.get("act_fn", "silu") != "silu":
        unsupported.append(f"act_fn {config['act_fn']!r}")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        unsupported.append("different input and output channel counts")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported AutoencoderKL: " + "; ".join(unsupported))
    defaults = VAEConfig()
    shift = config.get("shift_factor")
    return VAEConfig(
        latent_channels=config.get("latent_channels", 4),
        in_channels=config.get("in_channels", 3),
        block_out_channels=list(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", DEFAULT_NORM_GROUPS),
        shift_factor=0.0 if shift is None else float(shift),
        scaling_factor=float(config.get("scaling_factor", defaults.scaling_factor)),
        use_quant_conv=bool(use_quant_conv),
    )


def clip_config_from_weights(
    state: Mapping[str, torch.Tensor], source: str, name: str, *, num_heads: int | None = None, key_prefix: str = ""
) -> CLIPTextConfig:
    """A CLIPTextConfig for transformers-named CLIP text weights (`text_model.*`, `text_projection.weight`)."""
    what = f"{name} text encoder"
    shape = _Reader(state, source, what, key_prefix).shape
    vocab_size, hidden = shape("text_model.embeddings.token_embedding.weight")
    layers = _indices(state, r"text_model\.encoder\.layers\.(\d+)\.")
    projection = state.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        projection_dim=hidden if projection is None else projection.shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads if num_heads is not None else _heads(hidden, source, what),
        max_position_embeddings=shape("text_model.embeddings.position_embedding.weight")[0],
        hidden_act=CLIP_ACTIVATIONS[name],
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
    )


def t5_config_from_weights(state: Mapping[str, torch.Tensor], source: str, key_prefix: str = "") -> T5Config:
    """A T5Config (encoder only) for transformers-named T5 encoder weights."""
    what = "T5 text encoder"
    shape = _Reader(state, source, what, key_prefix).shape
    embedding = "shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"
    vocab_size, d_model = shape(embedding)
    block = "encoder.block.0.layer"
    buckets, heads = shape(f"{block}.0.SelfAttention.relative_attention_bias.weight")
    gated = f"{block}.1.DenseReluDense.wi_0.weight" in state
    d_ff = shape(f"{block}.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=shape(f"{block}.0.SelfAttention.q.weight")[0] // heads,
        d_ff=d_ff,
        num_layers=len(_indices(state, r"encoder\.block\.(\d+)\.")),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def mmdit_config_of(model) -> ModelConfig:
    """The ModelConfig a built `MMDiT` corresponds to (what an export writes down)."""
    return mmdit_config_from_weights(model.state_dict(), "the model", num_heads=model.num_heads)


def vae_config_of(vae) -> VAEConfig:
    """The VAEConfig (without `weights`) of a built `VAE`."""
    return vae_config_from_weights(
        vae.state_dict(), "the model", norm_num_groups=vae.encoder.conv_norm_out.num_groups,
        shift_factor=vae.shift_factor, scaling_factor=vae.scaling_factor,
    )
