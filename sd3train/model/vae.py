"""SD3's 16-channel KL autoencoder (diffusers `AutoencoderKL` as configured for SD3).

Parameter names match diffusers exactly (`encoder.down_blocks.0.resnets.0.norm1.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, ...), so a diffusers `vae/` folder loads with an
identity key mapping. SD3 drops the 1x1 quant/post-quant convs; `use_quant_conv=True` keeps them
(the SD1/SDXL autoencoders), off by default.

Latents leave `encode` normalised, `(z - shift_factor) * scaling_factor`, which is what the
diffusion model sees; `decode` undoes it. `encode_moments` gives the raw posterior for caches.

    vae = VAE.from_config(VAEConfig())    # random init; with the weights a config names: vae_from_config
    latents = vae.encode(images)          # (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)
    images = vae.decode(latents)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd3train.config.schema import VAEConfig

# diffusers builds every norm of the VAE with this epsilon.
NORM_EPS = 1e-6
# diffusers clamps log-variance to this range before taking exp.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without a time embedding: two norm-silu-conv steps plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 projection only where the width changes, as diffusers does.
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only (diffusers' encoder, downsample_padding=0): an even side halves exactly.
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own group norm and a residual.

    diffusers `Attention(heads=1, dim_head=channels, residual_connection=True, norm_num_groups=...)`.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list so the key is `to_out.0`, diffusers' name (its `to_out.1` is a parameterless dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x)
        h = h.reshape(batch, channels, height * width).transpose(1, 2)  # (B, H*W, C)
        q = self.to_q(h).unsqueeze(1)  # (B, 1, H*W, C): one head of width C
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        h = self.to_out[0](h)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers `UNetMidBlock2D`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        # Absent (not an empty list) on the last block, so the state dict has no key for it.
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """diffusers `UpDecoderBlock2D`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: list[int], layers_per_block: int,
                 groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(block_out_channels[max(i - 1, 0)], width, layers_per_block, groups, downsample=i < last)
                for i, width in enumerate(block_out_channels)
            ]
        )
        self.mid_block = MidBlock(block_out_channels[-1], groups)
        self.conv_norm_out = _group_norm(block_out_channels[-1], groups)
        # Mean and log-variance of the diagonal Gaussian posterior, stacked on channels.
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, latent_channels: int, block_out_channels: list[int], layers_per_block: int,
                 groups: int):
        super().__init__()
        reversed_widths = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, reversed_widths[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(reversed_widths[0], groups)
        last = len(reversed_widths) - 1
        # The decoder has one resnet more per block than the encoder (diffusers: layers_per_block + 1).
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(reversed_widths[max(i - 1, 0)], width, layers_per_block + 1, groups, upsample=i < last)
                for i, width in enumerate(reversed_widths)
            ]
        )
        self.conv_norm_out = _group_norm(block_out_channels[0], groups)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(
        self,
        latent_channels: int = 16,
        in_channels: int = 3,
        block_out_channels: list[int] | tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        shift_factor: float = 0.0609,
        scaling_factor: float = 1.5305,
        use_quant_conv: bool = False,
    ):
        super().__init__()
        block_out_channels = list(block_out_channels)
        bad = [width for width in block_out_channels if width % norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        self.latent_channels = latent_channels
        self.block_out_channels = block_out_channels
        self.shift_factor = float(shift_factor)
        self.scaling_factor = float(scaling_factor)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        # 1x1 convs on the posterior moments and on the latents before decoding (not in SD3's VAE).
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_quant_conv else None

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> "VAE":
        """The configured VAE, randomly initialised; `cfg.weights` is not read (`vae_from_config` in
        sd3train/checkpoint/components.py loads it)."""
        return cls(
            latent_channels=cfg.latent_channels,
            in_channels=cfg.in_channels,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            shift_factor=cfg.shift_factor,
            scaling_factor=cfg.scaling_factor,
            use_quant_conv=cfg.use_quant_conv,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior (mean, logvar), each (B, latent_channels, H/f, W/f)."""
        # Follow the weights' dtype, so a bf16 VAE takes the fp32 images a data loader gives.
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))  # (B, 2 * latent_channels, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what the diffusion model sees."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def encode(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8).

        `sample=False` returns the posterior mean; otherwise one draw, from `generator` if given.
        """
        mean, logvar = self.encode_moments(images)
        if not sample:
            return self.normalise(mean)
        # Draw on the generator's device so a CPU generator gives the same numbers on any device.
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
        return self.normalise(mean + torch.exp(0.5 * logvar) * noise)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        z = self.denormalise(latents).to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

