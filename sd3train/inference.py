"""Text-to-image generation from the three components, shared by training previews and sd3train-sample."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sd3train.config.schema import SamplerConfig
from sd3train.diffusion.sampler import euler_sample
from sd3train.durable import replace, sync, temporary_file


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so a seed gives the same image on any device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@torch.no_grad()
def generate_latents(
    model: nn.Module,
    text: nn.Module,
    prompts: list[str],
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    sampler: SamplerConfig,
) -> torch.Tensor:
    """Sampled latents [B, C, h, w] for `prompts`, one seed each, with CFG and skip-layer guidance
    as configured (`model` takes `skip_layers=`, as MMDiT does)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    removed = tuple(sampler.drop_encoders)
    context, pooled = text.encode(prompts, without=removed) if removed else text.encode(prompts)
    uncond_context = uncond_pooled = None
    if sampler.guidance_scale != 1.0:
        if sampler.uncond == "zeros":  # what the per-encoder dropout trained as "no caption"
            uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            empty = [""] * len(prompts)
            uncond_context, uncond_pooled = text.encode(empty, without=removed) if removed else text.encode(empty)
        uncond_context, uncond_pooled = uncond_context.to(device, dtype), uncond_pooled.to(device, dtype)
    noise = initial_noise(seeds, latent_shape).to(device, dtype)
    skip_layers = list(sampler.skip_layers)
    return euler_sample(
        model,
        noise,
        context.to(device, dtype),
        pooled.to(device, dtype),
        num_steps=sampler.num_steps,
        shift=sampler.shift,
        guidance_scale=sampler.guidance_scale,
        uncond_context=uncond_context,
        uncond_pooled=uncond_pooled,
        skip_layer_model=functools.partial(model, skip_layers=skip_layers) if skip_layers else None,
        skip_layer_scale=sampler.skip_layer_scale,
        skip_layer_start=sampler.skip_layer_start,
        skip_layer_stop=sampler.skip_layer_stop,
    )


@torch.no_grad()
def decode_to_uint8(vae: nn.Module, latents: torch.Tensor) -> list[np.ndarray]:
    """Decoded images as (H, W, 3) uint8 arrays."""
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype)).float()
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [image.permute(1, 2, 0).cpu().numpy() for image in images]  # (H, W, 3) each


def rank_chunks(count: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The prompt chunks (consecutive `batch_size` indices of `count`) rank `rank` samples: every
    `world_size`-th chunk. A chunk is sampled as one batch whatever the rank count, so an image is
    the same on 1 rank as on 8."""
    chunks = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    return chunks[rank::world_size]


@torch.no_grad()
def generate_images(
    model: nn.Module,
    text: nn.Module,
    vae: nn.Module,
    prompts: list[str],
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    sampler: SamplerConfig,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
) -> list[np.ndarray] | None:
    """Images for `prompts` (one seed each) sampled over `world_size` ranks, each its share of chunks
    (`rank_chunks`), gathered in prompt order on rank 0; other ranks get None. Every rank calls it.

    `lockstep`: the weights are sharded (FSDP2, ZeRO-3) and each forward gathers them from all ranks,
    so every rank runs as many chunks as the busiest one, a rank out of chunks sampling a stand-in
    (its first chunk, or the first of all) that it drops.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    mine = rank_chunks(len(prompts), batch_size, rank, world_size)
    rounds = len(rank_chunks(len(prompts), batch_size, 0, world_size)) if lockstep else len(mine)
    stand_in = (mine or rank_chunks(len(prompts), batch_size, 0, world_size))[:1]
    images: dict[int, np.ndarray] = {}
    for index in range(rounds):
        chunk = mine[index] if index < len(mine) else stand_in[0]
        latents = generate_latents(model, text, [prompts[i] for i in chunk], [seeds[i] for i in chunk],
                                   latent_shape, sampler)
        if index < len(mine):
            images.update(zip(chunk, decode_to_uint8(vae, latents)))
    if world_size > 1:
        gathered: list[dict] | None = [{} for _ in range(world_size)] if rank == 0 else None
        torch.distributed.gather_object(images, gathered, dst=0)
        if rank != 0:
            return None
        images = {index: image for part in gathered for index, image in part.items()}
    return [images[index] for index in range(len(prompts))]


def write_grid(path: Path, images: list[np.ndarray], columns: int) -> Path:
    """One PNG of `images` (each (H, W, 3) uint8, all one size) in rows of `columns`, row-major;
    the last row is padded with black."""
    if not images or columns < 1:
        raise ValueError(f"write_grid needs images and columns >= 1, got {len(images)} images, {columns} columns")
    height, width, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def write_samples(out_dir: Path, images: list[np.ndarray], prompts: list[str], seeds: list[int]) -> Path:
    """PNGs plus samples.jsonl (prompt, seed, file relative to out_dir); returns the jsonl path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        name = f"{index:04d}-seed{seed}.png"
        Image.fromarray(image).save(out_dir / name)
        records.append({"prompt": prompt, "seed": seed, "file": name})
    manifest = out_dir / "samples.jsonl"
    descriptor, temporary = temporary_file(out_dir, manifest.name)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write("".join(json.dumps(record) + "\n" for record in records))
            sync(stream)
        replace(temporary, manifest)
    finally:
        temporary.unlink(missing_ok=True)
    return manifest
