"""Numerical parity with diffusers' AutoencoderKL as SD3 configures it (no quant convs).

diffusers is a test-only reference: a random tiny AutoencoderKL's state dict must load into our
VAE with identity keys and give the same posterior and decoded images in fp32.
"""

import pytest
import torch

from sd3train.config.schema import VAEConfig
from sd3train.model.vae import VAE
from tests.support.reference_models import VAE_SIZES as SIZES
from tests.support.reference_models import diffusers_vae, relative_error

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = diffusers_vae(**SIZES, perturbed=True)
    ours = VAE(**SIZES).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def test_state_dict_keys_and_shapes_match_diffusers_at_sd3_sizes():
    with torch.device("meta"):
        reference = diffusers_vae([128, 256, 512, 512], 2, 32)
        ours = VAE.from_config(VAEConfig())
    reference_shapes = {key: tuple(t.shape) for key, t in reference.state_dict().items()}
    our_shapes = {key: tuple(t.shape) for key, t in ours.state_dict().items()}
    assert our_shapes == reference_shapes
    assert len(our_shapes) == 244


def test_posterior_matches_diffusers_latent_dist(pair):
    ours, reference = pair
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode_moments(images)
        posterior = reference.encode(images).latent_dist
    assert mean.shape == (2, 16, 8, 6)
    assert relative_error(mean, posterior.mean) < 1e-5
    assert relative_error(logvar, posterior.logvar) < 1e-5


def test_encode_mean_is_diffusers_mean_shifted_and_scaled(pair):
    ours, reference = pair
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(images, sample=False)
        expected = (reference.encode(images).latent_dist.mean - 0.0609) * 1.5305
    assert relative_error(latents, expected) < 1e-5


def test_decode_matches_diffusers_decode_of_raw_latents(pair):
    ours, reference = pair
    raw = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        images = ours.decode((raw - 0.0609) * 1.5305)
        expected = reference.decode(raw).sample
    assert images.shape == (2, 3, 64, 48)
    assert relative_error(images, expected) < 1e-5
