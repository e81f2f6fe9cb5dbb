"""MM-DiT: SD3's joint-attention diffusion transformer (SD3, SD3.5-Large, SD3.5-Medium "MMDiT-X").

Parameter names are those of Stability's single-file checkpoints under `model.diffusion_model.`
(without that prefix), so official weights load with `load_state_dict(strict=True)` as they are;
`sd3train.checkpoint.mmdit_diffusers` converts to and from diffusers' `SD3Transformer2DModel`.

    from sd3train.model.mmdit import MMDiT
    model = MMDiT(depth=2, context_dim=96, pooled_dim=48, in_channels=4, pos_embed_max_size=16, sample_size=16)
    velocity = model(latents, t, context, pooled)  # t (B,) in [0, 1]; t = 1 is pure noise

Training options that do not change the weights: `activation_checkpointing` (none, full, selective,
every_k; applied inside each joint block, so a block compiled by `sd3train.model.compile_blocks`
traces it) and `attention_backend` (which SDPA kernel runs, `sd3train.model.attention`).

Tests: `python -m pytest tests/unit/model -q -k "mmdit or compile or checkpointing or attention"`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sd3train.model.activation_checkpointing import block_checkpointing, selective_checkpoint_contexts
from sd3train.model.attention import ATTENTION_BACKENDS, Attention, joint_attention, sdpa_backends
from sd3train.model.embeddings import add_embedders, crop_pos_embed, crop_pos_embed_at, xavier_init

# The released models take the timestep as 1000 * t.
TIMESTEP_SCALE = 1000.0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, L, D) tokens, (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(hidden_size: int) -> nn.LayerNorm:
    # No affine: adaLN supplies scale and shift per sample.
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


_GELU_TANH_2C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SD3's MLP activation).

    Compiled, it is written as x * sigmoid(2z), which equals 0.5 x (1 + tanh(z)) since
    tanh(z) = 2 sigmoid(2z) - 1: inductor vectorises sigmoid on the CPU but not this tanh (forward and
    backward of a 820 x 1024 bf16 tensor: 2.1 ms against 4.5 ms on one core). Eager, torch's own
    kernel is one pass where the rewritten form would be five.
    """
    if torch.compiler.is_compiling():
        inner = _GELU_TANH_2C * (x + 0.044715 * x * x * x)  # 2 sqrt(2 / pi) (x + 0.044715 x^3)
        return x * torch.sigmoid(inner)
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN, its own attention projections and MLP.

    Split into `pre_attention` and `post_attention` because the attention itself is shared with
    the other stream. `pre_only` (last text stream): only (shift, scale) and q/k/v, nothing after.
    `dual_attention` (MMDiT-X image stream): an extra self-attention `attn2` over image tokens.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: Optional[str] = None,
        pre_only: bool = False,
        dual_attention: bool = False,
    ):
        super().__init__()
        if pre_only and dual_attention:
            raise ValueError("a pre-only stream cannot have dual attention")
        self.pre_only = pre_only
        self.dual_attention = dual_attention
        self.num_chunks = 2 if pre_only else (9 if dual_attention else 6)
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, pre_only=pre_only)
        if dual_attention:
            self.attn2 = Attention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = layer_norm(hidden_size)
            self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.num_chunks * hidden_size))

    def pre_attention(self, x: torch.Tensor, cond: torch.Tensor, attention_backends=None):
        """Tokens (B, L, D), conditioning (B, D) -> (q, k, v) for the joint attention, state for post_attention.

        `attention_backends` picks the SDPA kernels of the dual attention (`attention.sdpa_backends`)."""
        # Order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        mods = self.adaLN_modulation(cond).chunk(self.num_chunks, dim=1)  # each (B, D)
        normed = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(normed, mods[0], mods[1]))
        if self.pre_only:
            return qkv, None
        attn2_out = None
        if self.dual_attention:
            # Both attentions read the same norm1(x), each with its own modulation.
            attn2_out = self.attn2.self_attention(modulate(normed, mods[6], mods[7]), attention_backends)  # (B, L, D)
        return qkv, (x, mods, attn2_out)

    def post_attention(self, attn_out: torch.Tensor, state) -> torch.Tensor:
        """Joint-attention output (B, L, D) -> updated tokens (B, L, D)."""
        x, mods, attn2_out = state
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa[:, None] * self.attn.post_attention(attn_out)
        if attn2_out is not None:
            x = x + mods[8][:, None] * attn2_out
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """An image stream and a text stream that meet in one attention.

    `checkpointing` ("none", "full", "selective") applies while training with gradients; it lives
    here, not around the call, so a compiled block (`compile_blocks`) traces the checkpoint too, as
    torchtitan applies activation checkpointing before compiling.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: Optional[str] = None,
        context_pre_only: bool = False,
        dual_attention: bool = False,
    ):
        super().__init__()
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.context_block = StreamBlock(hidden_size, num_heads, pre_only=context_pre_only, **common)
        self.x_block = StreamBlock(hidden_size, num_heads, dual_attention=dual_attention, **common)
        self.checkpointing = "none"  # MMDiT.set_activation_checkpointing sets it

    def forward(self, context: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, attention_backends=None):
        """context (B, Lc, D), image tokens x (B, Lx, D), cond (B, D) -> (context or None, x).

        `attention_backends`: the SDPA kernels allowed (`attention.sdpa_backends`); None: torch's choice.
        """
        if self.checkpointing == "none" or not (self.training and torch.is_grad_enabled()):
            return self._forward(context, x, cond, attention_backends)
        # No random op in a block, so the recomputation needs no saved RNG state.
        options = dict(use_reentrant=False, preserve_rng_state=False)
        if self.checkpointing == "selective":
            options["context_fn"] = selective_checkpoint_contexts
        return torch.utils.checkpoint.checkpoint(self._forward, context, x, cond, attention_backends, **options)

    def _forward(self, context: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, attention_backends):
        context_qkv, context_state = self.context_block.pre_attention(context, cond, attention_backends)
        x_qkv, x_state = self.x_block.pre_attention(x, cond, attention_backends)
        context_out, x_out = joint_attention(context_qkv, x_qkv, attention_backends)  # (B, Lc, D), (B, Lx, D)
        x = self.x_block.post_attention(x_out, x_state)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context_out, context_state), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to patch pixels: (B, L, D) -> (B, L, p*p*out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """Rectified-flow velocity network: (latents, t, context, pooled) -> velocity.

    Width defaults to 64 * depth and heads to depth (head dim 64), as in SD3.
    """

    def __init__(
        self,
        *,
        depth: int,
        hidden_size: Optional[int] = None,
        num_heads: Optional[int] = None,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: Optional[int] = None,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        pos_embed_max_size: int = 192,
        sample_size: int = 128,
        qk_norm: Optional[str] = None,
        dual_attention_layers: Sequence[int] = (),
        qkv_bias: bool = True,
        activation_checkpointing: str | bool = "none",
        activation_checkpointing_every: int = 2,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden_size = 64 * depth if hidden_size is None else hidden_size
        num_heads = depth if num_heads is None else num_heads
        dual_attention_layers = tuple(sorted(set(int(i) for i in dual_attention_layers)))
        bad_layers = [i for i in dual_attention_layers if not 0 <= i < depth]
        if bad_layers:
            raise ValueError(f"dual_attention_layers {bad_layers} are outside 0..{depth - 1}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {attention_backend!r}")
        self.depth = depth
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.pos_embed_max_size = pos_embed_max_size
        self.dual_attention_layers = dual_attention_layers
        # Read at every forward, so it can be changed on a built model.
        self.attention_backend = attention_backend

        add_embedders(self, in_channels, hidden_size, patch_size, pos_embed_max_size, sample_size, pooled_dim,
                      context_dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden_size,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                context_pre_only=i == depth - 1,
                dual_attention=i in dual_attention_layers,
            )
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.set_activation_checkpointing(activation_checkpointing, activation_checkpointing_every)
        self.initialize_weights()

    def set_activation_checkpointing(self, mode: str | bool, every: int = 2) -> None:
        """What the joint blocks recompute in backward (ACTIVATION_CHECKPOINTING); `every` is every_k's k.
        True/False are the settings of older configs and checkpoints: full and none.
        Set it before `compile_blocks`: a compiled block recompiles when it changes."""
        if isinstance(mode, bool):
            mode = "full" if mode else "none"
        for block, block_mode in zip(self.joint_blocks, block_checkpointing(mode, every, self.depth)):
            block.checkpointing = block_mode
        self.activation_checkpointing = mode
        self.activation_checkpointing_every = every

    @classmethod
    def from_config(cls, cfg) -> "MMDiT":
        """The architecture a `sd3train.config.schema.ModelConfig` (or anything with its fields)
        describes, randomly initialised; `cfg.weights` is not read (`mmdit_from_config` in
        sd3train/checkpoint/components.py loads it)."""
        return cls(
            depth=cfg.depth,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            mlp_ratio=cfg.mlp_ratio,
            context_dim=cfg.context_dim,
            pooled_dim=cfg.pooled_dim,
            pos_embed_max_size=cfg.pos_embed_max_size,
            sample_size=cfg.sample_size,
            qk_norm=cfg.qk_norm,
            dual_attention_layers=tuple(cfg.dual_attention_layers),
            qkv_bias=cfg.qkv_bias,
            activation_checkpointing=cfg.activation_checkpointing,
            activation_checkpointing_every=cfg.activation_checkpointing_every,
            attention_backend=cfg.attention_backend,
        )

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT/SD3 init: xavier Linears with zero bias; adaLN outputs and the final linear zeroed.

        The zeroed modulations make every block start as the identity and the output exactly 0.
        """
        xavier_init(self)
        for module in self.modules():
            if isinstance(module, (StreamBlock, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def cropped_pos_embed(
        self, grid_h: int, grid_w: int, pos_offset: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Positions for a grid_h x grid_w patch grid: the centre crop of the stored table,
        (1, grid_h*grid_w, D), or crops at per-sample top-left `pos_offset` (B, 2), (B, grid_h*grid_w, D)."""
        if pos_offset is None:
            return crop_pos_embed(self.pos_embed, self.pos_embed_max_size, grid_h, grid_w)
        return crop_pos_embed_at(self.pos_embed, self.pos_embed_max_size, grid_h, grid_w, pos_offset)

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, grid_h*grid_w, p*p*C) -> (B, C, grid_h*p, grid_w*p)."""
        p, channels = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, channels)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], channels, grid_h * p, grid_w * p)  # (B, C, H, W)

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        skip_layers: Optional[Sequence[int]] = None,
        pos_offset: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Velocity for noisy latents.

        latents (B, C, H, W) with H, W divisible by patch_size; t (B,) in [0, 1];
        context (B, L, context_dim); pooled (B, pooled_dim); skip_layers: joint blocks to bypass
        (image and text updates both), for skip-layer guidance; pos_offset: (B, 2) integer top-left
        (row, col) of each sample's crop of the position table, for SD3.5-Medium's random-crop
        training (`embeddings.random_crop_offsets`); None is the centre crop inference uses.
        Returns (B, out_channels, H, W).
        """
        height, width = latents.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"latent size {height}x{width} is not divisible by patch_size {self.patch_size}"
            )
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        skip = set(skip_layers) if skip_layers is not None else set()

        x = self.x_embedder(latents)  # (B, h*w, D)
        if pos_offset is not None and pos_offset.shape[0] != latents.shape[0]:
            raise ValueError(f"pos_offset has {pos_offset.shape[0]} rows for a batch of {latents.shape[0]}")
        x = x + self.cropped_pos_embed(grid_h, grid_w, pos_offset).to(x.dtype)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        # Scaled in fp32: a bf16 t would round 1000 * t to steps of up to 4.
        cond = self.t_embedder(t.float() * TIMESTEP_SCALE) + self.y_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, L, D)

        # Resolved here, outside the blocks: a compiled block then sees a constant list, not a device query.
        attention_backends = sdpa_backends(self.attention_backend, x.device)
        for index, block in enumerate(self.joint_blocks):
            if index in skip:
                continue
            context, x = block(context, x, cond, attention_backends)

        x = self.final_layer(x, cond)  # (B, h*w, p*p*C)
        return self.unpatchify(x, grid_h, grid_w)
