"""Analytic FLOP count of the MM-DiT, for model FLOP utilisation (MFU).

Counts what `torch.utils.flop_counter.FlopCounterMode` counts: 2*m*n*k for every matmul (every
Linear and the patch-embedding conv; biases, norms, activations, modulation and the loss are not
counted) and, for each attention over L tokens, 2*B*heads*L^2*head_dim for QK^T plus the same
for the product with V. With SDPA's math backend `FlopCounterMode` reproduces the forward count
exactly (tests/unit/bench/test_flops.py); its CPU flash kernel is not counted by torch at all.

A training step is counted as 3x the forward (backward = 2x: input and weight gradients), the
usual convention for MFU: it counts model FLOPs, not the recomputation of activation
checkpointing, and ignores that the first layers need no gradient with respect to their input.

    from sd3train.model.flops import mmdit_forward_flops, training_step_flops
    flops = training_step_flops(config, batch=8, latent_h=64, latent_w=64, text_tokens=154)
"""

from __future__ import annotations

from sd3train.config.schema import ModelConfig
from sd3train.model.embeddings import TIMESTEP_FREQUENCY_DIM

TRAINING_FLOPS_PER_FORWARD = 3


def _linear(rows: int, in_features: int, out_features: int) -> int:
    return 2 * rows * in_features * out_features


def _attention(batch: int, heads: int, length: int, head_dim: int) -> int:
    # QK^T (B*heads, L, hd) x (hd, L) and scores x V (L, L) x (L, hd): 2*L*L*hd each.
    return 4 * batch * heads * length * length * head_dim


def mmdit_forward_flops_by_part(
    config: ModelConfig, batch: int, latent_h: int, latent_w: int, text_tokens: int
) -> dict[str, int]:
    """Forward FLOPs of `MMDiT.from_config(config)` split into parts (embedders, block matmuls,
    attention, final layer); their sum is `mmdit_forward_flops`."""
    patch = config.patch_size
    if latent_h % patch or latent_w % patch:
        raise ValueError(f"latent size {latent_h}x{latent_w} is not divisible by patch_size {patch}")
    hidden = config.hidden_size or 64 * config.depth
    heads = config.num_heads or config.depth
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads {heads}")
    head_dim = hidden // heads
    mlp_hidden = int(hidden * config.mlp_ratio)
    out_channels = config.out_channels or config.in_channels
    image_tokens = (latent_h // patch) * (latent_w // patch)
    image_rows, text_rows = batch * image_tokens, batch * text_tokens
    dual = set(config.dual_attention_layers)

    parts = {
        # A stride-p conv over p x p patches is a Linear from C*p*p to hidden per patch.
        "patch_embed": _linear(image_rows, config.in_channels * patch * patch, hidden),
        "timestep_embedder": _linear(batch, TIMESTEP_FREQUENCY_DIM, hidden) + _linear(batch, hidden, hidden),
        "pooled_embedder": _linear(batch, config.pooled_dim, hidden) + _linear(batch, hidden, hidden),
        "context_embedder": _linear(text_rows, config.context_dim, hidden),
        "adaln": 0,
        "block_linears": 0,
        "attention": 0,
        "final_layer": _linear(batch, hidden, 2 * hidden) + _linear(image_rows, hidden, patch * patch * out_channels),
    }

    def stream(rows: int, with_output: bool) -> int:
        # qkv, then (unless pre-only) the output projection and the two MLP layers.
        flops = _linear(rows, hidden, 3 * hidden)
        if with_output:
            flops += _linear(rows, hidden, hidden)
            flops += _linear(rows, hidden, mlp_hidden) + _linear(rows, mlp_hidden, hidden)
        return flops

    for index in range(config.depth):
        last = index == config.depth - 1
        image_chunks = 9 if index in dual else 6
        text_chunks = 2 if last else 6  # the last text stream only supplies keys and values
        parts["adaln"] += _linear(batch, hidden, image_chunks * hidden) + _linear(batch, hidden, text_chunks * hidden)
        parts["block_linears"] += stream(image_rows, True) + stream(text_rows, not last)
        # Joint attention over [text; image]; the last block still attends for all queries.
        parts["attention"] += _attention(batch, heads, text_tokens + image_tokens, head_dim)
        if index in dual:
            # MMDiT-X: a second qkv/proj and a self-attention over the image tokens only.
            parts["block_linears"] += _linear(image_rows, hidden, 3 * hidden) + _linear(image_rows, hidden, hidden)
            parts["attention"] += _attention(batch, heads, image_tokens, head_dim)
    return parts


def mmdit_forward_flops(config: ModelConfig, batch: int, latent_h: int, latent_w: int, text_tokens: int) -> int:
    """Matmul FLOPs of one forward of `MMDiT.from_config(config)` on (batch, C, latent_h, latent_w)
    latents with `text_tokens` context tokens."""
    return sum(mmdit_forward_flops_by_part(config, batch, latent_h, latent_w, text_tokens).values())


def training_step_flops(config: ModelConfig, batch: int, latent_h: int, latent_w: int, text_tokens: int) -> int:
    """Model FLOPs of one training step: forward + backward = 3x the forward."""
    return TRAINING_FLOPS_PER_FORWARD * mmdit_forward_flops(config, batch, latent_h, latent_w, text_tokens)
