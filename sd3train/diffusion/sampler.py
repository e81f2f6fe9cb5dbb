"""Euler ODE sampler for rectified-flow velocity models, with classifier-free and skip-layer guidance.

A velocity model is any callable

    model(latents (B, C, H, W), t (B,) in [0, 1], context (B, L, D), pooled (B, P)) -> velocity (B, C, H, W)

(our MM-DiT's forward; it multiplies t by 1000 itself). Sampling integrates dx/dt = v from
t = sigmas[0] (about 1, pure noise) down to t = 0 (data) on the schedule `sampling_sigmas`,
which reproduces diffusers' FlowMatchEulerDiscreteScheduler as StableDiffusion3Pipeline uses it.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

VelocityModel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sampling_sigmas(num_steps: int, shift: float, *, num_train_timesteps: int = 1000) -> Tensor:
    """Noise levels for `num_steps` Euler steps: (num_steps + 1,) float32, from 1 down to exactly 0.

    Bit-for-bit diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)
    (no dynamic shifting), quirk included: the scheduler's sigma_min is its training table's last
    entry, which is already shifted (shift(1/1000)); set_timesteps spaces linearly between
    sigma_max and that sigma_min and then shifts again. So the last non-zero sigma is
    shift(shift(1/1000)) (0.00893 for shift 3, not 0.00299), and the spacing is that of
    linspace(1, shift(1/1000)) rather than linspace(1, 1/1000).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # The scheduler's __init__: a shifted training table in fp32; keep its first and last entries.
    table = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    sigma_max, sigma_min = _shift(table, shift).tolist()
    # set_timesteps: numpy float64 linspace in "timestep" units, back to sigmas, shifted (again).
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = torch.from_numpy(_shift(timesteps / num_train_timesteps, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])  # (num_steps + 1,)


def _skip_layer_active(step: int, num_steps: int, start: float, stop: float) -> bool:
    # Strict inequalities on the step index, as in diffusers' SD3 pipeline and SD3.5's reference code:
    # with 28 steps and [0.01, 0.2], steps 1..5 are guided.
    return num_steps * start < step < num_steps * stop


@torch.no_grad()
def euler_sample(
    model: VelocityModel,
    noise: Tensor,
    context: Tensor,
    pooled: Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    uncond_context: Optional[Tensor] = None,
    uncond_pooled: Optional[Tensor] = None,
    skip_layer_model: Optional[VelocityModel] = None,
    skip_layer_scale: float = 0.0,
    skip_layer_start: float = 0.01,
    skip_layer_stop: float = 0.2,
) -> Tensor:
    """Integrate from `noise` (B, C, H, W) at t = sigmas[0] to latents at t = 0 with Euler steps.

    Each step: x <- x + (sigma_next - sigma) * v(x, sigma).
    CFG (guidance_scale != 1): cond and uncond run as one batch, uncond first like diffusers, and
        v = v_uncond + g * (v_cond - v_uncond).
    Skip-layer guidance (SD3.5): `skip_layer_model` has the model's signature and runs it with some
        layers skipped, on the cond inputs; while the step index is strictly inside
        (num_steps * start, num_steps * stop), v <- v + skip_layer_scale * (v_cond - v_skip).
    The state is accumulated in fp32 and returned in noise's dtype; the model gets x in noise's
    dtype and t as fp32 (B,).
    """
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        if uncond_context is None or uncond_pooled is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs uncond_context and uncond_pooled; "
                "pass them or use guidance_scale=1.0"
            )
        if uncond_context.shape != context.shape or uncond_pooled.shape != pooled.shape:
            raise ValueError(
                "uncond tensors must match the cond ones to run as one batch: context "
                f"{list(context.shape)} vs {list(uncond_context.shape)}, pooled {list(pooled.shape)} vs "
                f"{list(uncond_pooled.shape)}"
            )
        context_in = torch.cat([uncond_context, context])  # (2B, L, D)
        pooled_in = torch.cat([uncond_pooled, pooled])  # (2B, P)
    use_skip_layers = skip_layer_model is not None and skip_layer_scale != 0.0

    sigmas = sampling_sigmas(num_steps, shift).tolist()
    batch = noise.shape[0]
    x = noise.float()
    for step in range(num_steps):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        t = torch.full((batch,), sigma, dtype=torch.float32, device=noise.device)  # (B,)
        x_in = x.to(noise.dtype)
        if use_cfg:
            both = model(torch.cat([x_in, x_in]), torch.cat([t, t]), context_in, pooled_in).float()  # (2B, C, H, W)
            v_uncond, v_cond = both.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v_cond = model(x_in, t, context, pooled).float()
            v = v_cond
        if use_skip_layers and _skip_layer_active(step, num_steps, skip_layer_start, skip_layer_stop):
            v_skip = skip_layer_model(x_in, t, context, pooled).float()
            v = v + skip_layer_scale * (v_cond - v_skip)
        x = x + (sigma_next - sigma) * v
    return x.to(noise.dtype)
