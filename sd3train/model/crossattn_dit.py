"""A cross-attention DiT: the baseline SD3 compares its MM-DiT against, for the architecture study only.

    model = CrossAttentionDiT.from_config(cfg.model)      # cfg.model.architecture == "crossattn_dit"
    velocity = model(latents, t, context, pooled)         # MMDiT's call

SD3 (section 5.2.1, figure 4) trains DiT with its text tokens as keys and values of a cross-attention
in every block (the "CrossDiT" of PixArt-alpha) against MM-DiT, whose text tokens are a second
stream with weights of their own that meets the image stream in one joint attention. Here each
block is adaLN-modulated self-attention over the image tokens, cross-attention from them to the
embedded text (which no block updates), and the MLP; embeddings, patching and the final layer are
MMDiT's. A block holds 22 D^2 weights against an MM-DiT block's 36, so depth 6 matches the
tiny MM-DiT's depth 4 at width 128 (conf/study/architecture.yaml; the report lists both counts).
Training only: no official weights, adapters, compiled blocks or sharding (config validation says so).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from sd3train.model.attention import Attention, RMSNorm, attention, sdpa_backends
from sd3train.model.embeddings import add_embedders, crop_pos_embed, xavier_init
from sd3train.model.mmdit import MLP, TIMESTEP_SCALE, FinalLayer, MMDiT, layer_norm, modulate


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys, values): (B, Lx, D), (B, Lc, D) -> (B, Lx, D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: Optional[str]):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.ln_q = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.ln_k = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, backends=None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.ln_q(self.q(x).view(batch, length, self.num_heads, self.head_dim))  # (B, Lx, heads, hd)
        kv = self.kv(context).view(batch, context.shape[1], 2, self.num_heads, self.head_dim)  # (B, Lc, 2, heads, hd)
        k, v = kv.unbind(dim=2)
        k = self.ln_k(k)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backends)  # (B, Lx, D)
        return self.proj(out)


class CrossAttentionBlock(nn.Module):
    """adaLN self-attention, cross-attention to the text, adaLN MLP (DiT with PixArt-alpha's cross-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: Optional[str], qkv_bias: bool):
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.norm2 = layer_norm(hidden_size)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm3 = layer_norm(hidden_size)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor, backends=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=1)  # each (B, D)
        x = x + gate1[:, None] * self.attn.self_attention(modulate(self.norm1(x), shift1, scale1), backends)
        x = x + self.cross_attn(self.norm2(x), context, backends)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class CrossAttentionDiT(nn.Module):
    """(latents, t, context, pooled) -> velocity, with text through cross-attention (module docstring)."""

    def __init__(self, *, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2, in_channels: int = 16,
                 out_channels: Optional[int] = None, mlp_ratio: float = 4.0, context_dim: int = 4096,
                 pooled_dim: int = 2048, pos_embed_max_size: int = 192, sample_size: int = 128,
                 qk_norm: Optional[str] = None, qkv_bias: bool = True, attention_backend: str = "auto"):
        super().__init__()
        self.depth, self.hidden_size, self.patch_size = depth, hidden_size, patch_size
        self.out_channels = in_channels if out_channels is None else out_channels
        self.pos_embed_max_size = pos_embed_max_size
        self.attention_backend = attention_backend
        add_embedders(self, in_channels, hidden_size, patch_size, pos_embed_max_size, sample_size, pooled_dim, context_dim)
        self.blocks = nn.ModuleList(CrossAttentionBlock(hidden_size, num_heads, mlp_ratio, qk_norm, qkv_bias)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, cfg) -> "CrossAttentionDiT":
        return cls(depth=cfg.depth, hidden_size=cfg.hidden_size or 64 * cfg.depth, num_heads=cfg.num_heads or cfg.depth,
                   patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                   mlp_ratio=cfg.mlp_ratio, context_dim=cfg.context_dim, pooled_dim=cfg.pooled_dim,
                   pos_embed_max_size=cfg.pos_embed_max_size, sample_size=cfg.sample_size, qk_norm=cfg.qk_norm,
                   qkv_bias=cfg.qkv_bias, attention_backend=cfg.attention_backend)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MMDiT's init; the cross-attention's output zeroed too, so every block starts as the identity."""
        xavier_init(self)
        for block in self.blocks:
            for layer in (block.adaLN_modulation[-1], block.cross_attn.proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Optional[Sequence[int]] = None, pos_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """latents (B, C, H, W), t (B,) in [0, 1], context (B, L, context_dim), pooled (B, pooled_dim)
        -> (B, out_channels, H, W). Neither skip-layer guidance nor crop offsets (validation refuses them)."""
        if skip_layers or pos_offset is not None:
            raise ValueError("the cross-attention DiT takes neither skip_layers nor pos_offset")
        height, width = latents.shape[-2:]
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = self.x_embedder(latents)  # (B, h*w, D)
        x = x + crop_pos_embed(self.pos_embed, self.pos_embed_max_size, grid_h, grid_w).to(x.dtype)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        cond = self.t_embedder(t.float() * TIMESTEP_SCALE) + self.y_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, L, D)
        backends = sdpa_backends(self.attention_backend, x.device)
        for block in self.blocks:
            x = block(x, context, cond, backends)
        return self.unpatchify(self.final_layer(x, cond), grid_h, grid_w)  # (B, C, H, W)

    unpatchify = MMDiT.unpatchify  # reads patch_size and out_channels only
