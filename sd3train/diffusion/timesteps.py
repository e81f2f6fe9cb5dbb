"""Training timestep densities and shifts (SD3 paper, section 3.1 and 5.3.2), as pure functions.

Every draw takes an explicit `torch.Generator`, so a (seed, step, rank) generator reproduces the
exact timesteps of any step after a resume. `density_cdf` gives each density's analytic CDF so
tests can check the samplers with a Kolmogorov-Smirnov test.

    t ~ density          t in [0, 1], t = 1 is pure noise
    t' = shift_timesteps(t, shift)   pushes mass towards noise for shift > 1
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch
from scipy.special import ndtr
from torch import Tensor

DENSITIES: tuple[str, ...] = ("logit_normal", "mode", "cosmap", "uniform")

# Above this the mode map t(u) stops being monotone (dt/du changes sign), so it is no density.
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


def _check_density(density: str) -> None:
    if density not in DENSITIES:
        raise ValueError(f"unknown timestep density {density!r}; valid densities: {', '.join(DENSITIES)}")


def _check_mode_scale(mode_scale: float) -> None:
    if not -1.0 <= mode_scale <= MODE_SCALE_MAX:
        raise ValueError(
            f"mode_scale must lie in [-1, 2/(pi-2) = {MODE_SCALE_MAX:.4f}] for mode sampling to be a "
            f"valid density, got {mode_scale}"
        )


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")


def _mode_t_of_u(u, mode_scale: float):
    """Mode sampling's map u -> t, monotone decreasing from t(0) = 1 to t(1) = 0 (numpy or torch)."""
    lib = torch if isinstance(u, Tensor) else np
    return 1 - u - mode_scale * (lib.cos(math.pi / 2 * u) ** 2 - 1 + u)


def shift_timesteps(t: ArrayOrTensor, shift: float) -> ArrayOrTensor:
    """SD3's shift `shift * t / (1 + (shift - 1) * t)`: fixes 0 and 1; shift > 1 moves t towards 1 (noise).

    Its inverse is `shift_timesteps(t, 1 / shift)`.
    """
    _check_shift(shift)
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base_resolution: int = 256) -> float:
    """SD3's alpha = sqrt(pixels / base_pixels): 1024x1024 -> 4.0 (SD3 itself used 3.0 at 1024^2)."""
    if height <= 0 or width <= 0 or base_resolution <= 0:
        raise ValueError(f"height, width and base_resolution must be > 0, got {height}, {width}, {base_resolution}")
    return math.sqrt(height * width / base_resolution**2)


def flux_dynamic_shift_mu(
    image_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's mu: linear in the image token count through (base_tokens, base_shift) and (max_tokens, max_shift)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def flux_shift_timesteps(t: ArrayOrTensor, mu: float) -> ArrayOrTensor:
    """Flux's shift `e^mu / (e^mu + (1/t - 1))`.

    Multiplying through by t gives `e^mu t / (1 + (e^mu - 1) t)`: SD3's shift with shift = e^mu,
    which is how it is computed here (no division by zero at t = 0).
    """
    return shift_timesteps(t, math.exp(mu))


def sample_timesteps(
    batch_size: int,
    density: str,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw `batch_size` training timesteps in [0, 1] from `density`, then shift them: (B,) float32.

    Draws happen on the generator's device (a generator only feeds its own device) and are moved
    to `device` afterwards. The maps are evaluated in float64: in fp32, pi/2 * u rounds past pi/2
    for u near 1 and CosMap's tan turns negative.
    """
    _check_density(density)
    _check_shift(shift)
    if density == "mode":
        _check_mode_scale(mode_scale)
    if density == "logit_normal" and not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    draw = dict(generator=generator, device=generator.device, dtype=torch.float64)
    if density == "logit_normal":
        t = torch.sigmoid(torch.randn(batch_size, **draw) * logit_std + logit_mean)
    else:
        u = torch.rand(batch_size, **draw)  # [0, 1)
        if density == "uniform":
            t = u
        elif density == "mode":
            t = _mode_t_of_u(u, mode_scale)
        else:  # cosmap
            t = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    # Clamp only float64 rounding (mode's t can come out at -1e-17).
    t = shift_timesteps(t.clamp(0.0, 1.0), shift)
    return t.to(device=device if device is not None else generator.device, dtype=torch.float32)


def _mode_cdf(t: np.ndarray, mode_scale: float, iterations: int = 60) -> np.ndarray:
    """P(T <= t) = 1 - u(t), with u(t) the inverse of the decreasing map found by bisection."""
    low = np.zeros_like(t)  # t(low) >= t
    high = np.ones_like(t)  # t(high) <= t
    for _ in range(iterations):  # 2^-60: below float64 resolution of u
        mid = 0.5 * (low + high)
        above = _mode_t_of_u(mid, mode_scale) > t
        low = np.where(above, mid, low)
        high = np.where(above, high, mid)
    return 1.0 - 0.5 * (low + high)


def density_cdf(
    density: str,
    t: ArrayOrTensor,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> ArrayOrTensor:
    """Analytic CDF P(T <= t) of `density`, with the same parameters as `sample_timesteps`.

    With shift != 1 it is the CDF of the shifted draws: the shift is increasing, so
    P(shift(T) <= t) = P(T <= shift^-1(t)) = CDF(shift_timesteps(t, 1 / shift)).
    Returns the type it is given (numpy array, or tensor of t's float dtype); computed in float64.
    """
    _check_density(density)
    _check_shift(shift)
    is_tensor = isinstance(t, Tensor)
    x = t.detach().cpu().double().numpy() if is_tensor else np.asarray(t, dtype=np.float64)
    x = np.clip(shift_timesteps(x, 1.0 / shift), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        if density == "uniform":
            cdf = x
        elif density == "logit_normal":
            # logit(0) = -inf and logit(1) = +inf give CDF 0 and 1, as they should.
            cdf = ndtr((np.log(x) - np.log1p(-x) - logit_mean) / logit_std)
        elif density == "cosmap":
            # Invert t = 1 - 1/(tan(pi/2 u) + 1): tan(pi/2 u) = t / (1 - t), and u is increasing in t.
            cdf = 2.0 / math.pi * np.arctan2(x, 1.0 - x)
        else:  # mode
            _check_mode_scale(mode_scale)
            cdf = _mode_cdf(x, mode_scale)
    if is_tensor:
        dtype = t.dtype if t.is_floating_point() else torch.float64
        return torch.as_tensor(cdf, dtype=torch.float64).to(device=t.device, dtype=dtype)
    return cdf
