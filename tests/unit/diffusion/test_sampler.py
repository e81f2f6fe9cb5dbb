"""Euler sampler: the sigma schedule (diffusers parity), exactness on linear fields, CFG and skip-layer guidance."""

import pytest
import torch
from torch import nn

from sd3train.diffusion.flow import interpolate
from sd3train.diffusion.sampler import euler_sample, sampling_sigmas

SHAPE = (2, 4, 3, 3)  # (B, C, H, W)


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    x0 = torch.randn(SHAPE, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)  # (B, L, D)
    pooled = torch.randn(2, 6, generator=generator)  # (B, P)
    return noise, x0, context, pooled


def _constant(velocity: torch.Tensor):
    """A model whose velocity ignores its inputs; repeated over the batch when CFG doubles it."""
    return lambda latents, t, context, pooled: velocity.repeat(latents.shape[0] // velocity.shape[0], 1, 1, 1)


@pytest.mark.parametrize("num_steps, shift", [(28, 3.0), (10, 1.0), (50, 3.0), (1, 3.0), (40, 2.5)])
def test_sigmas_equal_diffusers_flow_match_euler_scheduler(num_steps, shift):
    schedulers = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    scheduler = schedulers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = sampling_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=1e-6)


def test_sigma_schedule_quirk_shifts_the_last_sigma_twice():
    sigmas = sampling_sigmas(28, 3.0)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    once = 3 * 0.001 / (1 + 2 * 0.001)
    twice = 3 * once / (1 + 2 * once)  # 0.0089286, not 0.0029940
    assert sigmas[-2].item() == pytest.approx(twice, abs=1e-7)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        sampling_sigmas(10, 0.0)


def test_constant_straight_path_velocity_lands_on_data():
    noise, x0, context, pooled = _inputs()
    sigma0 = sampling_sigmas(28, 3.0)[0].item()
    start = x0 + sigma0 * (noise - x0)
    out = euler_sample(_constant(noise - x0), start, context, pooled, num_steps=28, shift=3.0)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_point_mass_field_is_integrated_exactly_through_every_sigma():
    # v(x, t) = (x - x0) / t is the exact velocity towards a single data point x0. It is linear in x and
    # Euler solves it exactly: x(s') - x0 = (x(s) - x0) * s'/s. So step k must see x on the straight
    # line at sigma_k, with t = sigma_k.
    noise, x0, context, pooled = _inputs(1)
    seen = []

    def model(latents, t, ctx, pool):
        seen.append((latents.clone(), t.clone()))
        return (latents - x0) / t.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)

    num_steps, shift = 12, 3.0
    sigmas = sampling_sigmas(num_steps, shift)
    out = euler_sample(model, noise, context, pooled, num_steps=num_steps, shift=shift)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert len(seen) == num_steps
    for k, (latents, t) in enumerate(seen):
        assert t.shape == (2,) and t.dtype == torch.float32 and torch.equal(t, sigmas[k].expand(2))
        torch.testing.assert_close(latents, interpolate(x0, noise, t), rtol=0, atol=1e-5)


def test_cfg_combines_constant_fields_and_batches_uncond_first():
    noise, _, context, pooled = _inputs(2)
    uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    u, c, g = torch.full(SHAPE, 0.5), torch.full(SHAPE, -1.0), 4.5
    batches = []

    def model(latents, t, ctx, pool):
        batches.append((latents.shape[0], ctx.clone(), pool.clone()))
        is_uncond = (ctx == 0).flatten(1).all(dim=1).reshape(-1, 1, 1, 1)  # (2B, 1, 1, 1)
        return torch.where(is_uncond, u[0], c[0]).expand(latents.shape[0], *SHAPE[1:]).clone()

    out = euler_sample(
        model, noise, context, pooled, num_steps=7, shift=3.0, guidance_scale=g,
        uncond_context=uncond_context, uncond_pooled=uncond_pooled,
    )
    # sigmas run from 1 to 0, so x_end = noise - v_effective.
    torch.testing.assert_close(out, noise - (u + g * (c - u)), rtol=0, atol=1e-5)
    assert len(batches) == 7
    size, ctx, pool = batches[0]
    assert size == 4
    assert torch.equal(ctx[:2], uncond_context) and torch.equal(ctx[2:], context)
    assert torch.equal(pool[:2], uncond_pooled) and torch.equal(pool[2:], pooled)


def test_guidance_without_uncond_raises_and_scale_one_ignores_uncond():
    noise, _, context, pooled = _inputs()
    with pytest.raises(ValueError, match="uncond_context and uncond_pooled"):
        euler_sample(_constant(torch.ones(SHAPE)), noise, context, pooled, num_steps=2, guidance_scale=5.0)
    sizes = []

    def model(latents, t, ctx, pool):
        sizes.append(latents.shape[0])
        return torch.ones_like(latents)

    euler_sample(model, noise, context, pooled, num_steps=3, uncond_context=context, uncond_pooled=pooled)
    assert sizes == [2, 2, 2]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_skip_layer_guidance_only_inside_its_step_window(guidance_scale):
    noise, _, context, pooled = _inputs(3)
    c, k, scale = torch.full(SHAPE, 2.0), torch.full(SHAPE, 0.5), 2.5
    skip_steps = []

    def skip_model(latents, t, ctx, pool):
        skip_steps.append(t[0].item())
        assert latents.shape[0] == 2 and torch.equal(ctx, context)  # cond inputs only
        return k.clone()

    num_steps, shift = 28, 3.0
    out = euler_sample(
        _constant(c), noise, context, pooled, num_steps=num_steps, shift=shift,
        guidance_scale=guidance_scale, uncond_context=torch.zeros_like(context),
        uncond_pooled=torch.zeros_like(pooled), skip_layer_model=skip_model, skip_layer_scale=scale,
        skip_layer_start=0.01, skip_layer_stop=0.2,
    )
    sigmas = sampling_sigmas(num_steps, shift)
    # Steps i with 28 * 0.01 < i < 28 * 0.2, i.e. 1..5, as diffusers' SD3 pipeline.
    assert skip_steps == sigmas[1:6].tolist()
    # With cond == uncond == c, CFG leaves c; the window adds scale * (c - k) over sigma_1 -> sigma_6.
    expected = noise - c + scale * (c - k) * (sigmas[6] - sigmas[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_matches_a_diffusers_scheduler_loop_with_cfg():
    schedulers = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    noise, _, context, pooled = _inputs(4)
    uncond_context, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled)

    def model(latents, t, ctx, pool):  # nonlinear in x, t and the conditioning
        bias = ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + pool.mean(dim=1).reshape(-1, 1, 1, 1)
        return torch.tanh(latents) * t.reshape(-1, 1, 1, 1) + bias - 0.3 * latents

    num_steps, shift, g = 15, 3.0, 5.0
    ours = euler_sample(
        model, noise, context, pooled, num_steps=num_steps, shift=shift, guidance_scale=g,
        uncond_context=uncond_context, uncond_pooled=uncond_pooled,
    )
    scheduler = schedulers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    latents = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(4)  # diffusers feeds t * 1000; our models take t
        both = model(torch.cat([latents] * 2), t, torch.cat([uncond_context, context]),
                     torch.cat([uncond_pooled, pooled]))
        v_uncond, v_cond = both.chunk(2)
        latents = scheduler.step(v_uncond + g * (v_cond - v_uncond), timestep, latents, return_dict=False)[0]
    torch.testing.assert_close(ours, latents, rtol=0, atol=1e-5)


def test_runs_without_grad_and_returns_noise_dtype():
    noise, _, context, pooled = _inputs()
    layer = nn.Conv2d(4, 4, 1)
    out = euler_sample(lambda x, t, ctx, pool: layer(x), noise, context, pooled, num_steps=3)
    assert not out.requires_grad
    out_bf16 = euler_sample(_constant(torch.ones(SHAPE)), noise.bfloat16(), context, pooled, num_steps=3)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16, (noise.bfloat16().float() - 1).bfloat16())  # bf16 tolerance


def test_skip_layer_window_edges_are_exclusive():
    # 10 steps in [0.1, 0.5]: the edges fall on steps 1 and 5, which diffusers leaves unguided.
    noise, _, context, pooled = _inputs()
    steps = []
    sigmas = sampling_sigmas(10, 1.0).tolist()

    def skip_model(latents, t, ctx, pool):
        steps.append(sigmas.index(t[0].item()))
        return torch.zeros_like(latents)

    euler_sample(
        _constant(torch.ones(SHAPE)), noise, context, pooled, num_steps=10, skip_layer_model=skip_model,
        skip_layer_scale=1.0, skip_layer_start=0.1, skip_layer_stop=0.5,
    )
    assert steps == [2, 3, 4]
    # Scale 0 turns it off without calling the skip model.
    steps.clear()
    euler_sample(_constant(torch.ones(SHAPE)), noise, context, pooled, num_steps=10, skip_layer_model=skip_model)
    assert steps == []
