"""Input embeddings of the MM-DiT: patches, 2-D sin-cos positions, timestep and pooled text.

Parameter names follow Stability's official SD3 checkpoints (`x_embedder.proj`,
`t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`) so released weights load without renaming.
The numerics match diffusers' `PatchEmbed`, `get_2d_sincos_pos_embed` and
`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)` exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TIMESTEP_FREQUENCY_DIM = 256


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (embed_dim / 2)); returns (M, embed_dim) float64."""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    # float64 frequencies as diffusers computes them, so the fp32 table is bit-identical.
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = torch.outer(positions.reshape(-1), omega)  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, D)


def sincos_2d_table(
    hidden_size: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos table for a square `grid_size` grid, row-major: (grid_size**2, hidden_size) float32.

    Positions are `index / (grid_size / base_size) / interpolation_scale`, so the table spans
    `base_size` units whatever its size. The first half of each vector encodes the column, the
    second half the row (diffusers' and SD3's layout).
    """
    if hidden_size % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table, got {hidden_size}")
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size) / interpolation_scale
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # each (grid, grid)
    emb_col = sincos_1d(hidden_size // 2, cols)  # (grid*grid, D/2)
    emb_row = sincos_1d(hidden_size // 2, rows)  # (grid*grid, D/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (grid*grid, D)


def crop_pos_embed(table: torch.Tensor, max_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Centre crop of a (1, max*max, D) table to a (grid_h, grid_w) patch grid: returns (1, grid_h*grid_w, D)."""
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(
            f"patch grid {grid_h}x{grid_w} is larger than pos_embed_max_size {max_size}; "
            "use smaller latents or a model with a larger pos_embed_max_size"
        )
    top = (max_size - grid_h) // 2
    left = (max_size - grid_w) // 2
    spatial = table.reshape(1, max_size, max_size, -1)  # (1, max, max, D)
    spatial = spatial[:, top : top + grid_h, left : left + grid_w, :]  # (1, grid_h, grid_w, D)
    return spatial.reshape(1, grid_h * grid_w, -1)  # (1, grid_h*grid_w, D)


def crop_pos_embed_at(
    table: torch.Tensor, max_size: int, grid_h: int, grid_w: int, offsets: torch.Tensor
) -> torch.Tensor:
    """Per-sample crops of a (1, max*max, D) table: `offsets` (B, 2) holds each crop's top-left
    (row, col). Returns (B, grid_h*grid_w, D); an offset of the centre crop gives `crop_pos_embed`."""
    if offsets.ndim != 2 or offsets.shape[1] != 2 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position offsets must be an integer (B, 2) tensor of (row, col), got {tuple(offsets.shape)} "
                         f"{offsets.dtype}")
    offsets = offsets.to(torch.int64)
    rows_ok = (offsets[:, 0] >= 0) & (offsets[:, 0] + grid_h <= max_size)
    cols_ok = (offsets[:, 1] >= 0) & (offsets[:, 1] + grid_w <= max_size)
    try:
        # Checked where the offsets are: on a GPU the step goes on (a failure surfaces as a device
        # assert), since reading the answer back would make every training step wait.
        torch._assert_async((rows_ok & cols_ok).all(), "a position crop leaves the position table")
    except RuntimeError:  # on the CPU the check is immediate
        raise ValueError(f"a {grid_h}x{grid_w} crop at offsets {offsets.tolist()} leaves the {max_size}x{max_size} "
                         "position table") from None
    offsets = offsets.to(table.device)
    rows = offsets[:, :1] + torch.arange(grid_h, device=table.device)  # (B, grid_h)
    cols = offsets[:, 1:] + torch.arange(grid_w, device=table.device)  # (B, grid_w)
    index = rows[:, :, None] * max_size + cols[:, None, :]  # (B, grid_h, grid_w): row-major table index
    return table[0][index.flatten(1)]  # (B, grid_h*grid_w, D)


def random_crop_offsets(
    batch_size: int,
    grid_h: int,
    grid_w: int,
    max_size: int,
    generator: torch.Generator,
    region: int | None = None,
) -> torch.Tensor:
    """Uniform top-left (row, col) offsets (B, 2) int64 of grid_h x grid_w crops of a max_size table.

    SD3.5-Medium's training augmentation. Crops stay inside the centred `region` x `region` window
    (None: the whole table); an axis longer than the window keeps its centre offset. With
    region == grid the offsets are exactly the centre crop that inference uses.
    """
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(f"patch grid {grid_h}x{grid_w} is larger than pos_embed_max_size {max_size}")
    window = max_size if region is None else min(region, max_size)
    axes = []
    for grid in (grid_h, grid_w):
        span = max(window, grid)
        low = (max_size - span) // 2  # centred like crop_pos_embed, so the window's middle is the centre crop's
        draws = torch.randint(0, span - grid + 1, (batch_size,), generator=generator, device=generator.device)
        axes.append(low + draws)
    return torch.stack(axes, dim=1)  # (B, 2)


def timestep_frequencies(timesteps: torch.Tensor, dim: int = TIMESTEP_FREQUENCY_DIM, max_period: float = 10000.0):
    """Sinusoidal features of (already scaled) timesteps: (B,) -> (B, dim) float32, cos half first."""
    half = dim // 2
    # Computed in fp32 even for a bf16 model: bf16 cannot resolve neighbouring timesteps near 1000.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping patches of the latent -> tokens: (B, C, H, W) -> (B, H/p * W/p, hidden)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(latents)  # (B, hidden, H/p, W/p)
        # Contiguous: a transposed view would make every LayerNorm copy it and every residual add stride.
        return tokens.flatten(2).transpose(1, 2).contiguous()  # (B, H/p * W/p, hidden)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; named `mlp.0` / `mlp.2` as in the official checkpoints."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class TimestepEmbedder(MLPEmbedder):
    """Scaled timestep (B,) -> 256 sinusoidal features -> (B, hidden)."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM):
        super().__init__(frequency_dim, hidden_size)
        self.frequency_dim = frequency_dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_frequencies(timesteps, self.frequency_dim)  # (B, 256) fp32
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def add_embedders(model: nn.Module, in_channels: int, hidden_size: int, patch_size: int, pos_embed_max_size: int,
                  sample_size: int, pooled_dim: int, context_dim: int) -> None:
    """A denoiser's inputs, under the official checkpoints' names: x_embedder (patches), pos_embed
    (the sin-cos table), t_embedder and y_embedder (timestep, pooled text), context_embedder."""
    model.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
    # Persistent: the official checkpoints store the table, and a loaded one must be used as is.
    table = sincos_2d_table(hidden_size, pos_embed_max_size, base_size=sample_size // patch_size)
    model.register_buffer("pos_embed", table.unsqueeze(0), persistent=True)  # (1, max*max, D)
    model.t_embedder = TimestepEmbedder(hidden_size)
    model.y_embedder = MLPEmbedder(pooled_dim, hidden_size)
    model.context_embedder = nn.Linear(context_dim, hidden_size)


@torch.no_grad()
def xavier_init(model: nn.Module) -> None:
    """DiT's init of a denoiser with an `x_embedder`: xavier Linears with zero bias, the patch
    embedding as a Linear over flattened patches."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
