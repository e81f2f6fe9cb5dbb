"""The shipped VAE configs: the tiny fitted VAE keeps shape colours, and its latents are normalised."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import sd3train
from sd3train.checkpoint.components import vae_from_config
from sd3train.config.compose import group_option
from sd3train.config.schema import VAEConfig
from sd3train.data.shapes import image_to_array, make_sample, parse_caption
from sd3train.eval.colour import dominant_colour
from sd3train.eval.shape import dominant_shape
from sd3train.model.vae import VAE

REPO = Path(sd3train.__file__).resolve().parents[1]
# A dataset seed used neither by fit_tiny_vae (910_001..910_003) nor by the shards.
TEST_SEED = 424_242


def load_conf(name: str) -> VAEConfig:
    """The shipped `vae=<name>` option: the schema's defaults with conf/vae/<name>.yaml on top."""
    mapping = group_option("vae", name)
    return VAEConfig(**mapping)  # an unknown or misspelt field raises here


def shape_batch(count: int) -> tuple[torch.Tensor, list[str]]:
    samples = [make_sample(TEST_SEED, index, 64) for index in range(count)]
    pixels = np.stack([image_to_array(image) for image, _ in samples])  # (B, H, W, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    return images, [caption for _, caption in samples]


@pytest.fixture(scope="module")
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return vae_from_config(load_conf("tiny")).eval()


def test_sd3_conf_is_the_paper_vae():
    cfg = load_conf("sd3")
    assert cfg == VAEConfig(weights=None)
    assert (cfg.shift_factor, cfg.scaling_factor, cfg.latent_channels) == (0.0609, 1.5305, 16)


def test_tiny_conf_agrees_with_the_shipped_config_json():
    cfg = load_conf("tiny")
    shipped = json.loads((REPO / "data" / "vae_tiny" / "config.json").read_text())
    assert asdict(cfg) == shipped
    assert cfg.weights == "data/vae_tiny/vae.safetensors"  # relative: resolved against the repo root
    assert (REPO / cfg.weights).stat().st_size < 5_000_000
    assert 2 ** (len(cfg.block_out_channels) - 1) == 8 and cfg.latent_channels == 16


def test_tiny_vae_reconstructions_keep_the_shape_and_its_colour(tiny_vae):
    images, captions = shape_batch(8)
    with torch.no_grad():
        reconstructions = tiny_vae.decode(tiny_vae.encode(images, sample=False))
    pixels = ((reconstructions.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    colours = [dominant_colour(image) for image in pixels]
    assert colours == [parse_caption(caption).colour for caption in captions]
    # The diffusion model is judged on the shapes it draws too: the decoder must not blur them away.
    assert [dominant_shape(image) for image in pixels] == [parse_caption(caption).shape for caption in captions]
    mse = float(((reconstructions.clamp(-1, 1) - images) / 2).pow(2).mean())
    assert 10 * np.log10(1 / mse) > 22.0  # PSNR in dB on [0, 1] pixels


def test_tiny_vae_latents_are_roughly_zero_mean_unit_std(tiny_vae):
    images, _ = shape_batch(64)
    with torch.no_grad():
        latents = tiny_vae.encode(images, sample=False)
    assert latents.shape == (64, 16, 8, 8)
    assert abs(float(latents.mean())) < 0.15
    assert 0.85 < float(latents.std()) < 1.15
