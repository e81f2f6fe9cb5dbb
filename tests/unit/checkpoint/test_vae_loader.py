"""load_vae: diffusers AutoencoderKL folders (parity), our shipped tiny VAE, Stability LDM names, .ckpt."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd3train.checkpoint import load_vae
from sd3train.checkpoint.components import vae_from_config
from sd3train.checkpoint.vae_ldm import diffusers_to_ldm, ldm_to_diffusers
from sd3train.config.schema import VAEConfig
from sd3train.model.vae import VAE
from tests.support.reference_models import (
    SD3_SCALING_FACTOR,
    SD3_SHIFT_FACTOR,
    VAE_SIZES,
    diffusers_vae,
    relative_error,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = diffusers_vae(**VAE_SIZES, perturbed=True, shift_factor=SD3_SHIFT_FACTOR,
                              scaling_factor=SD3_SCALING_FACTOR)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    reference.save_pretrained(str(folder))
    return reference, folder


def images(seed: int, height: int = 64, width: int = 48) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_mean_and_decode_match_diffusers(saved):
    reference, folder = saved
    vae = load_vae(folder)
    assert (vae.block_out_channels, vae.latent_channels) == (VAE_SIZES["block_out_channels"], 16)
    assert (vae.shift_factor, vae.scaling_factor) == (SD3_SHIFT_FACTOR, SD3_SCALING_FACTOR)
    pixels = images(1)
    raw = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latents = vae.encode(pixels, sample=False)
        expected_latents = (reference.encode(pixels).latent_dist.mean - SD3_SHIFT_FACTOR) * SD3_SCALING_FACTOR
        decoded = vae.decode((raw - SD3_SHIFT_FACTOR) * SD3_SCALING_FACTOR)
        expected_images = reference.decode(raw).sample
    assert latents.shape == (2, 16, 8, 6)
    assert relative_error(latents, expected_latents) < 1e-5  # measured 3.9e-7
    assert relative_error(decoded, expected_images) < 1e-5  # measured 1.4e-6
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_ldm_names_round_trip_and_equal_diffusers_conversion(saved):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    reference, folder = saved
    state = reference.state_dict()
    ldm = diffusers_to_ldm(state)
    assert "encoder.down.0.block.0.norm1.weight" in ldm and "decoder.up.3.block.2.conv2.bias" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 convs in LDM
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dict(reference.config))
    ours = ldm_to_diffusers(ldm)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[key], state[key]) and torch.equal(theirs[key], state[key]) for key in state)


def test_bare_file_in_ldm_names_loads_with_sd3_defaults(tmp_path):
    sd3_groups = dict(VAE_SIZES, block_out_channels=[32, 64, 64, 64], norm_num_groups=32)
    model = VAE(**sd3_groups)
    save_file(diffusers_to_ldm(model.state_dict()), str(tmp_path / "ae.safetensors"))
    vae = load_vae(tmp_path / "ae.safetensors")
    assert vae.encoder.conv_norm_out.num_groups == 32
    assert (vae.shift_factor, vae.scaling_factor) == (SD3_SHIFT_FACTOR, SD3_SCALING_FACTOR)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), model.state_dict().values()))


def test_shipped_tiny_vae_folder_and_file_agree():
    folder_vae = load_vae("data/vae_tiny")
    reference = vae_from_config(VAEConfig(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=8,
                                          weights="data/vae_tiny/vae.safetensors"))
    assert folder_vae.scaling_factor == pytest.approx(0.605499)
    expected = load_file("data/vae_tiny/vae.safetensors")
    assert all(torch.equal(folder_vae.state_dict()[key], value) for key, value in expected.items())
    assert all(torch.equal(a, b) for a, b in zip(folder_vae.state_dict().values(), reference.state_dict().values()))


def test_training_checkpoint_reads_the_vae_its_config_names(training_checkpoint):
    vae = load_vae(training_checkpoint)  # the .ckpt has no vae.*: the config names data/vae_tiny
    expected = load_file("data/vae_tiny/vae.safetensors")
    assert vae.scaling_factor == pytest.approx(0.605499)
    assert all(torch.equal(vae.state_dict()[key], value) for key, value in expected.items())


def test_training_checkpoint_with_a_saved_vae_uses_it(training_checkpoint, tmp_path):
    """A run whose VAE was not loaded from a file saves vae.* in the checkpoint; those weights win."""
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    config = dict(checkpoint["sd3train_config"]["vae"], weights=None)
    checkpoint["sd3train_config"] = {**checkpoint["sd3train_config"], "vae": config}
    saved = VAE.from_config(VAEConfig(**config))
    checkpoint["state_dict"].update({"vae." + key: value for key, value in saved.state_dict().items()})
    torch.save(checkpoint, tmp_path / "with_vae.ckpt")
    vae = load_vae(tmp_path / "with_vae.ckpt", dtype=torch.bfloat16)
    assert all(torch.equal(vae.state_dict()[key], value.bfloat16()) for key, value in saved.state_dict().items())


def test_autoencoder_with_quant_convs_matches_diffusers(tmp_path):
    """SD1/SDXL-style folders (diffusers' default use_quant_conv=True) load too."""
    reference = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32], latent_channels=16, norm_num_groups=8, scaling_factor=0.5,
    )
    perturb_all = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, parameter in sorted(reference.named_parameters()):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=perturb_all))
    reference.save_pretrained(str(tmp_path / "vae"))
    vae = load_vae(tmp_path / "vae")
    assert vae.quant_conv is not None and (vae.shift_factor, vae.scaling_factor) == (0.0, 0.5)
    pixels, raw = images(6, 16, 16), torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert relative_error(vae.encode(pixels, sample=False), reference.encode(pixels).latent_dist.mean * 0.5) < 1e-5
        assert relative_error(vae.decode(raw * 0.5), reference.decode(raw).sample) < 1e-5
    ldm = diffusers_to_ldm(vae.state_dict())
    assert "quant_conv.weight" in ldm and ldm_to_diffusers(ldm).keys() == vae.state_dict().keys()
