"""Timestep densities (checked against analytic CDFs with KS tests), shifts and their validation."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from sd3train.diffusion.timesteps import (
    DENSITIES,
    density_cdf,
    flux_dynamic_shift_mu,
    flux_shift_timesteps,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
)

NUM_DRAWS = 20_000


def _draws(density: str, seed: int = 0, **params) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return sample_timesteps(NUM_DRAWS, density, generator, **params).double().numpy()


@pytest.mark.parametrize(
    "density, params",
    [
        ("logit_normal", {}),
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.7}),
        ("mode", {}),
        ("mode", {"mode_scale": -0.8}),
        ("mode", {"mode_scale": 2 / (math.pi - 2)}),
        ("cosmap", {}),
        ("uniform", {}),
        ("logit_normal", {"shift": 3.0}),
        ("uniform", {"shift": 0.5}),
    ],
)
def test_draws_follow_the_analytic_cdf(density, params):
    draws = _draws(density, **params)
    result = kstest(draws, lambda t: density_cdf(density, t, **params))
    assert result.pvalue > 0.01, result


@pytest.mark.parametrize(
    "density, params, wrong_density, wrong_params",
    [
        ("logit_normal", {}, "uniform", {}),
        ("mode", {}, "uniform", {}),
        ("cosmap", {}, "logit_normal", {}),
        ("logit_normal", {"shift": 3.0}, "logit_normal", {}),  # forgetting the shift is caught
        ("logit_normal", {}, "logit_normal", {"logit_mean": 0.1}),
    ],
)
def test_ks_test_rejects_a_wrong_cdf(density, params, wrong_density, wrong_params):
    draws = _draws(density, **params)
    assert kstest(draws, lambda t: density_cdf(wrong_density, t, **wrong_params)).pvalue < 1e-6


def test_mode_cdf_at_hand_computed_point():
    # u = 0.25, s = 1.29: t = 0.75 - 1.29 * (cos^2(pi/8) - 0.75) = 0.6164...; P(T <= t) = 1 - u.
    t = 0.75 - 1.29 * (math.cos(math.pi / 8) ** 2 - 0.75)
    assert density_cdf("mode", np.array([t]), mode_scale=1.29)[0] == pytest.approx(0.75, abs=1e-12)
    # Scale 0 is the uniform density.
    grid = np.linspace(0, 1, 11)
    np.testing.assert_allclose(density_cdf("mode", grid, mode_scale=0.0), grid, atol=1e-12)


def test_cdfs_run_from_zero_to_one_and_accept_tensors():
    grid = torch.linspace(0, 1, 101)
    for density in DENSITIES:
        cdf = density_cdf(density, grid)
        assert isinstance(cdf, torch.Tensor) and cdf.dtype == torch.float32
        assert cdf[0].item() == 0.0 and cdf[-1].item() == 1.0
        assert bool((cdf[1:] >= cdf[:-1]).all()), density
    assert density_cdf("logit_normal", np.array([0.5]))[0] == pytest.approx(0.5)
    assert density_cdf("cosmap", np.array([0.5]))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("density", DENSITIES)
def test_same_seed_same_draws_different_seed_different(density):
    first = sample_timesteps(64, density, torch.Generator().manual_seed(7))
    again = sample_timesteps(64, density, torch.Generator().manual_seed(7))
    other = sample_timesteps(64, density, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.shape == (64,)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_draws_advance_the_generator_and_land_on_device():
    generator = torch.Generator().manual_seed(0)
    first = sample_timesteps(8, "uniform", generator, device="cpu")
    second = sample_timesteps(8, "uniform", generator, device=torch.device("cpu"))
    assert not torch.equal(first, second)
    assert second.device == torch.device("cpu")


def test_unknown_density_error_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'lognorm'.*logit_normal, mode, cosmap, uniform"):
        sample_timesteps(4, "lognorm", torch.Generator())
    with pytest.raises(ValueError, match="'lognorm'"):
        density_cdf("lognorm", np.array([0.5]))


@pytest.mark.parametrize("mode_scale", [-1.01, 1.76])
def test_mode_scale_outside_valid_range_raises(mode_scale):
    with pytest.raises(ValueError, match=r"mode_scale must lie in \[-1, 2/\(pi-2\)"):
        sample_timesteps(4, "mode", torch.Generator(), mode_scale=mode_scale)


def test_shift_exact_values():
    t = torch.tensor([0.0, 0.5, 1.0, 0.25])
    assert shift_timesteps(t, 3.0).tolist() == [0.0, 0.75, 1.0, 0.5]  # 0.75 / 1.5 = 0.5
    assert torch.equal(shift_timesteps(t, 1.0), t)
    # 1 / shift inverts the shift (what density_cdf relies on).
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift_timesteps(shift_timesteps(grid, 3.0), 1 / 3.0), grid, rtol=0, atol=1e-15)
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="shift must be > 0"):
            shift_timesteps(t, bad)


def test_sample_timesteps_applies_the_shift_to_the_same_draws():
    plain = sample_timesteps(32, "logit_normal", torch.Generator().manual_seed(3))
    shifted = sample_timesteps(32, "logit_normal", torch.Generator().manual_seed(3), shift=3.0)
    torch.testing.assert_close(shifted, shift_timesteps(plain.double(), 3.0).float(), rtol=0, atol=1e-6)
    assert float((shifted - plain).min()) > 0  # shift > 1 moves every interior t towards noise


def test_resolution_shift_values():
    assert resolution_shift(1024, 1024) == 4.0
    assert resolution_shift(512, 512) == 2.0
    assert resolution_shift(256, 256) == 1.0
    assert resolution_shift(768, 1024, base_resolution=512) == pytest.approx(math.sqrt(3.0))


def test_flux_mu_endpoints_and_shift_formula():
    assert flux_dynamic_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_dynamic_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flux_dynamic_shift_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-12)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    mu = 1.15
    shifted = flux_shift_timesteps(t, mu)
    interior = math.exp(mu) / (math.exp(mu) + (1 / t[1:4] - 1))
    torch.testing.assert_close(shifted[1:4], interior, rtol=0, atol=1e-15)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0

