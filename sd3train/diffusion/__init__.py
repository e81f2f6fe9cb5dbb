"""Rectified-flow core: the objective (flow), training timesteps (timesteps), the Euler sampler (sampler)."""

from sd3train.diffusion.flow import binned_mean, interpolate, per_sample_mse, velocity_target
from sd3train.diffusion.sampler import euler_sample, sampling_sigmas
from sd3train.diffusion.timesteps import (
    DENSITIES,
    density_cdf,
    flux_dynamic_shift_mu,
    flux_shift_timesteps,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
)

__all__ = [
    "DENSITIES",
    "binned_mean",
    "density_cdf",
    "euler_sample",
    "flux_dynamic_shift_mu",
    "flux_shift_timesteps",
    "interpolate",
    "per_sample_mse",
    "resolution_shift",
    "sample_timesteps",
    "sampling_sigmas",
    "shift_timesteps",
    "velocity_target",
]
