"""Rectified-flow objective as pure functions: the straight path, its velocity, the loss, loss per t-bin.

    z_t = (1 - t) * x0 + t * noise      t in [0, 1], t = 1 is pure noise
    v   = d z_t / d t = noise - x0      what the network predicts

Nothing here draws random numbers; callers pass the noise and the timesteps in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over every non-batch dim of `like`."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [B]={[like.shape[0]]}, got {list(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Point on the straight path from data `x0` (t=0) to `noise` (t=1); t has shape [B].

    Computed in at least fp32 (a bf16 t cannot resolve nearby timesteps), returned in x0's dtype
    so the model sees inputs of the dtype it was given latents in.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {list(x0.shape)} and noise {list(noise.shape)} must have the same shape")
    compute_dtype = torch.promote_types(torch.promote_types(x0.dtype, noise.dtype), torch.float32)
    t = _per_sample(t, x0).to(compute_dtype)
    z = (1 - t) * x0.to(compute_dtype) + t * noise.to(compute_dtype)
    return z.to(x0.dtype)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """d z_t / d t along the straight path: constant in t."""
    return noise - x0


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all non-batch dims, in fp32: (B, ...) -> (B,)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ in shape")
    # Upcast before squaring: bf16 squared errors summed over a 16x128x128 latent lose most digits.
    squared = (prediction.float() - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)  # (B,)


def masked_per_sample_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-sample MSE weighted by `mask` (B, 1, H, W) in [0, 1] over (B, C, H, W) latents, normalised
    by the masked area: elements where the mask is 0 contribute nothing (and get no gradient); an
    all-ones mask gives `per_sample_mse`. A sample whose mask is all zero contributes 0."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ in shape")
    mask = mask.float()
    squared = (prediction.float() - target.float()) ** 2 * mask  # (B, C, H, W)
    area = mask.sum(dim=(1, 2, 3)) * prediction.shape[1]  # (B,): masked elements over every channel
    return squared.sum(dim=(1, 2, 3)) / area.clamp(min=1e-8)


def binned_mean(values: Tensor, t: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Per-timestep-bin sums and counts of `values` (e.g. per-sample losses), both (num_bins,).

    Bin i covers [i/n, (i+1)/n); t = 1 goes in the last bin. Returning sums and counts (not means)
    lets callers accumulate over steps and all-reduce over ranks before dividing. Counts are in
    `values`' dtype for the same reason.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if values.ndim != 1 or t.shape != values.shape:
        raise ValueError(f"values and t must both have shape [B], got {list(values.shape)} and {list(t.shape)}")
    t = t.to(values.device)
    # float64 so the product t * n of an fp32 t is never rounded up onto the next bin edge.
    bins = torch.floor(t.double() * num_bins).long().clamp_(0, num_bins - 1)  # (B,)
    sums = torch.zeros(num_bins, dtype=values.dtype, device=values.device).index_add_(0, bins, values)
    counts = torch.zeros(num_bins, dtype=values.dtype, device=values.device).index_add_(
        0, bins, torch.ones_like(values)
    )
    return sums, counts


def prior_preservation_loss(losses: Tensor, prior: Tensor, weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, instance mean, prior mean) of per-sample `losses` (B,) where `prior` (B,) in {0, 1} marks
    the class images: the instance samples' mean plus `weight` times the class images' mean. Means
    are masked sums (a part absent from the batch gives 0), so nothing is read back to the host."""
    instance = (losses * (1 - prior)).sum() / (1 - prior).sum().clamp(min=1)
    prior_mean = (losses * prior).sum() / prior.sum().clamp(min=1)
    return instance + weight * prior_mean, instance, prior_mean

