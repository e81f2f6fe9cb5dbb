"""A diffusers SD3 pipeline folder loaded into sd3train samples what StableDiffusion3Pipeline samples.

Same initial noise, prompts, steps, CFG scale and shift 3; the pipeline encodes the negative prompt
"" with the text encoders, so our sampler uses uncond="empty_prompt" (not the trained "zeros").
"""

import pytest
import torch

from sd3train.checkpoint import load_text_conditioner, load_transformer, load_vae
from sd3train.config.schema import SamplerConfig
from sd3train.inference import generate_latents, initial_noise
from tests.support.reference_models import relative_error

pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
SEEDS = [3, 4]
LATENT_SHAPE = (16, 8, 6)  # (C, h, w): non-square, 16x12 pixels with the 2-level VAE


def pipeline_latents(pipeline, noise: torch.Tensor, sampler: SamplerConfig, **options) -> torch.Tensor:
    """What StableDiffusion3Pipeline samples for PROMPTS from `noise`, with the sampler's steps and CFG."""
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    with torch.no_grad():
        return pipeline(
            prompt=PROMPTS, num_inference_steps=sampler.num_steps, guidance_scale=sampler.guidance_scale,
            latents=noise.clone(), height=LATENT_SHAPE[1] * scale, width=LATENT_SHAPE[2] * scale,
            output_type="latent", **options,
        ).images


def test_euler_cfg_sampling_matches_the_diffusers_pipeline(tiny_pipeline, tiny_pipeline_folder):
    pipeline, _ = tiny_pipeline
    sampler = SamplerConfig(num_steps=4, guidance_scale=4.5, shift=3.0, uncond="empty_prompt")
    model = load_transformer(tiny_pipeline_folder)
    text = load_text_conditioner(tiny_pipeline_folder)  # T5 length: the pipeline's default, 256
    ours = generate_latents(model, text, PROMPTS, SEEDS, LATENT_SHAPE, sampler)

    noise = initial_noise(SEEDS, LATENT_SHAPE)
    expected = pipeline_latents(pipeline, noise, sampler)
    assert pipeline.scheduler.config.shift == 3.0
    assert (expected - noise).abs().mean() > 0.1  # the model moved the latents
    assert relative_error(ours, expected) < 1e-4  # measured 5.3e-7 (3.1e-7 at 28 steps, CFG 7)

    # Both sides normalise latents as (z - shift) * scale: decoding them gives the same images.
    vae = load_vae(tiny_pipeline_folder)
    config = pipeline.vae.config
    with torch.no_grad():
        expected_images = pipeline.vae.decode(expected / config.scaling_factor + config.shift_factor).sample
        assert relative_error(vae.decode(expected), expected_images) < 1e-5


def test_zeros_uncond_differs_from_the_pipeline(tiny_pipeline, tiny_pipeline_folder):
    """Guard for the comparison above: the choice of unconditional embedding is visible."""
    pipeline, t5_length = tiny_pipeline
    model = load_transformer(tiny_pipeline_folder)
    text = load_text_conditioner(tiny_pipeline_folder, t5_max_length=t5_length)
    configs = [SamplerConfig(num_steps=2, guidance_scale=4.5, shift=3.0, uncond=u) for u in ("zeros", "empty_prompt")]
    zeros, empty = (generate_latents(model, text, PROMPTS[:1], SEEDS[:1], LATENT_SHAPE, c) for c in configs)
    assert relative_error(zeros, empty) > 1e-3


def test_skip_layer_guidance_matches_the_diffusers_pipeline(tiny_pipeline, tiny_pipeline_folder):
    """SD3.5-Medium's skip-layer guidance, at toy size: block 0 of the 2 skipped, steps 1-3 of 10 guided."""
    pipeline, _ = tiny_pipeline
    guided = SamplerConfig(num_steps=10, guidance_scale=4.5, shift=3.0, uncond="empty_prompt", skip_layers=[0],
                           skip_layer_scale=2.5, skip_layer_start=0.01, skip_layer_stop=0.35)
    model = load_transformer(tiny_pipeline_folder)
    text = load_text_conditioner(tiny_pipeline_folder)
    ours = generate_latents(model, text, PROMPTS, SEEDS, LATENT_SHAPE, guided)

    expected = pipeline_latents(
        pipeline, initial_noise(SEEDS, LATENT_SHAPE), guided, skip_guidance_layers=[0], skip_layer_guidance_scale=2.5,
        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.35,
    )
    assert relative_error(ours, expected) < 1e-4  # measured 3.4e-7
    unguided = generate_latents(model, text, PROMPTS, SEEDS, LATENT_SHAPE,
                                SamplerConfig(num_steps=10, guidance_scale=4.5, shift=3.0, uncond="empty_prompt"))
    assert relative_error(ours, unguided) > 1e-3  # the guidance changed the result


def test_sampling_without_t5_matches_the_pipeline_without_its_t5(tiny_pipeline, tiny_pipeline_folder):
    """diffusion.sampler.drop_encoders=[t5] is diffusers' StableDiffusion3Pipeline built with
    text_encoder_3=None (SD3's T5-free inference: zeros in place of T5's tokens, prompt and negative)."""
    from diffusers import StableDiffusion3Pipeline

    pipeline, _ = tiny_pipeline
    without_t5 = StableDiffusion3Pipeline(**{**pipeline.components, "text_encoder_3": None, "tokenizer_3": None})
    sampler = SamplerConfig(num_steps=4, guidance_scale=4.5, shift=3.0, uncond="empty_prompt", drop_encoders=["t5"])
    model = load_transformer(tiny_pipeline_folder)
    text = load_text_conditioner(tiny_pipeline_folder)
    ours = generate_latents(model, text, PROMPTS, SEEDS, LATENT_SHAPE, sampler)
    expected = pipeline_latents(without_t5, initial_noise(SEEDS, LATENT_SHAPE), sampler)
    assert relative_error(ours, expected) < 1e-4
    with_t5 = generate_latents(model, text, PROMPTS, SEEDS, LATENT_SHAPE, SamplerConfig(
        num_steps=4, guidance_scale=4.5, shift=3.0, uncond="empty_prompt"))
    assert relative_error(with_t5, expected) > 1e-3  # T5 mattered: the check above can fail
