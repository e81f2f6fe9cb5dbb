"""MM-DiT numerics against diffusers (a test-only reference) and the official <-> diffusers key conversion."""

import functools

import pytest
import torch

from sd3train.checkpoint.mmdit_diffusers import OFFICIAL_PREFIX, diffusers_to_official, official_to_diffusers
from sd3train.model.embeddings import sincos_2d_table, timestep_frequencies
from sd3train.model.mmdit import MMDiT
from tests.support.reference_models import MMDIT_DEPTH as DEPTH
from tests.support.reference_models import MMDIT_LATENT_SIZES as LATENT_SIZES
from tests.support.reference_models import MMDIT_VARIANTS as CONFIGS
from tests.support.reference_models import diffusers_transformer, perturb, relative_error
from tests.support.reference_models import mmdit_inputs as inputs

diffusers = pytest.importorskip("diffusers")



@functools.lru_cache(maxsize=None)
def reference_model(name: str):
    return diffusers_transformer(name)


def our_model(name: str) -> MMDiT:
    qk_norm, dual = CONFIGS[name]
    return MMDiT(depth=DEPTH, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                 pos_embed_max_size=16, sample_size=16, qk_norm=qk_norm, dual_attention_layers=dual).eval()


@pytest.mark.parametrize("height,width", LATENT_SIZES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers_after_key_conversion(name, height, width):
    reference = reference_model(name)
    model = our_model(name)
    model.load_state_dict(diffusers_to_official(reference.state_dict(), DEPTH), strict=True)
    latents, t, context, pooled = inputs(height, width)
    with torch.no_grad():
        expected = reference(latents, context, pooled, t * 1000).sample  # diffusers takes 1000 * t
        out = model(latents, t, context, pooled)
    assert expected.abs().mean() > 0.1  # the perturbed reference is far from its zero init
    assert relative_error(out, expected) < 1e-5  # measured about 2.5e-7


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium"])
def test_skip_layers_match_diffusers(name):
    reference = reference_model(name)
    model = our_model(name)
    model.load_state_dict(diffusers_to_official(reference.state_dict(), DEPTH), strict=True)
    latents, t, context, pooled = inputs(12, 20)
    with torch.no_grad():
        expected = reference(latents, context, pooled, t * 1000, skip_layers=[0]).sample
        out = model(latents, t, context, pooled, skip_layers=[0])
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_conversion_round_trips_exactly(name):
    state = reference_model(name).state_dict()
    back = official_to_diffusers(diffusers_to_official(state, DEPTH), DEPTH)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_keys_are_what_diffusers_single_file_loader_expects(name):
    """diffusers' own converter for official single-file checkpoints accepts our state dict unchanged."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = perturb(our_model(name), seed=5)
    official = {OFFICIAL_PREFIX + key: value for key, value in model.state_dict().items()}
    ours_converted = official_to_diffusers(official, DEPTH)
    leftover = dict(official)
    theirs_converted = convert_sd3_transformer_checkpoint_to_diffusers(leftover)
    assert leftover == {}  # it consumed every key we have
    assert theirs_converted.keys() == ours_converted.keys()
    for key in theirs_converted:
        assert torch.equal(theirs_converted[key], ours_converted[key]), key
    reference = reference_model(name)
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    try:
        reference.load_state_dict(theirs_converted, strict=True)
        latents, t, context, pooled = inputs(16, 16)
        with torch.no_grad():
            expected = reference(latents, context, pooled, t * 1000).sample
            out = model(latents, t, context, pooled)
        assert relative_error(out, expected) < 1e-5
    finally:
        reference.load_state_dict(original, strict=True)


def test_conversion_lists_missing_and_unexpected_keys():
    state = dict(reference_model("sd3-medium").state_dict())
    del state["proj_out.bias"]
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys: \['proj_out.bias'\].*unexpected keys: .*attn.extra"):
        diffusers_to_official(state, DEPTH)
    with pytest.raises(KeyError, match="unexpected keys"):
        official_to_diffusers(our_model("sd3-medium").state_dict(), DEPTH - 1)


def test_models_without_qkv_bias_convert_both_ways():
    model = MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                  pos_embed_max_size=16, sample_size=16, qkv_bias=False)
    state = model.state_dict()
    converted = official_to_diffusers(state, 2)
    assert "transformer_blocks.0.attn.to_q.weight" in converted
    assert not any(key.endswith(("to_q.bias", "add_k_proj.bias")) for key in converted)
    back = diffusers_to_official(converted, 2)
    assert back.keys() == state.keys()


def test_pos_embed_table_equals_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for hidden, grid, base in [(64, 16, 8), (384, 48, 16), (96, 12, 4)]:
        expected = get_2d_sincos_pos_embed(hidden, grid_size=grid, base_size=base, interpolation_scale=1).float()
        assert torch.equal(sincos_2d_table(hidden, grid, base_size=base), expected)


def test_timestep_frequencies_equal_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.tensor([0.0, 1.5, 250.25, 999.0, 1000.0])
    expected = get_timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_frequencies(timesteps), expected)
