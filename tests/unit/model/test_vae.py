"""The 16-channel VAE: shapes, latent normalisation, downsampling layout, strict weight loading."""

import pytest
import torch
from safetensors.torch import save_file

from sd3train.checkpoint import CheckpointError
from sd3train.checkpoint.components import vae_from_config
from sd3train.config.schema import VAEConfig
from sd3train.model.vae import VAE, Downsample

TINY = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)


def tiny_vae(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(**{**TINY, **overrides}).eval()


def test_encode_and_decode_shapes_follow_the_downsample_factor():
    vae = tiny_vae()
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images)
        decoded = vae.decode(latents)
    assert vae.downsample_factor == 8
    assert latents.shape == (2, 16, 8, 6)
    assert decoded.shape == (2, 3, 64, 48)


def test_sd3_sizes_give_83_8m_parameters_and_factor_8():
    with torch.device("meta"):
        vae = VAE.from_config(VAEConfig())
    assert vae.downsample_factor == 8
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_encode_without_sampling_is_the_normalised_posterior_mean():
    vae = tiny_vae(shift_factor=0.3, scaling_factor=1.7)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(images)
        latents = vae.encode(images, sample=False)
    torch.testing.assert_close(latents, (mean - 0.3) * 1.7, rtol=0, atol=1e-6)
    assert mean.shape == logvar.shape == (2, 16, 4, 4)


def test_encode_sample_draws_from_the_posterior_with_the_given_generator():
    vae = tiny_vae(shift_factor=0.3, scaling_factor=1.7)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(images)
        first = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
        again = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    expected = (mean + torch.exp(0.5 * logvar) * noise - 0.3) * 1.7
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    assert torch.equal(first, again)
    # A random-init posterior has std near 1, so a draw is far from the mean.
    assert (first - (mean - 0.3) * 1.7).abs().mean() > 0.5


def test_decode_undoes_the_normalisation_before_the_decoder():
    vae = tiny_vae(shift_factor=0.3, scaling_factor=1.7)
    raw = torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        from_normalised = vae.decode((raw - 0.3) * 1.7)
        from_raw = vae.decoder(raw)
    torch.testing.assert_close(from_normalised, from_raw, rtol=0, atol=1e-5)
    assert from_raw.shape == (2, 3, 32, 40)


def test_downsample_pads_right_and_bottom_only():
    # A kernel that copies its centre tap: with (0, 1, 0, 1) padding, output (i, j) reads input (2i+1, 2j+1);
    # symmetric padding would read (2i, 2j).
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0
        down.conv.bias.zero_()
        x = torch.arange(64.0).reshape(1, 1, 8, 8)
        out = down(x)
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0].tolist() == x[0, 0, 1::2, 1::2].tolist()


def test_load_reports_the_first_missing_key_and_the_file(tmp_path):
    state = tiny_vae().state_dict()
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(state, str(tmp_path / "my.safetensors"))
    with pytest.raises(CheckpointError, match=r"my\.safetensors.*missing.*'decoder\.mid_block\.attentions\.0\.to_q\.weight'"):
        vae_from_config(VAEConfig(**TINY, weights=str(tmp_path / "my.safetensors")))


def test_weights_of_another_architecture_are_refused_naming_the_file_and_field(tmp_path):
    vae = tiny_vae()
    state = {**vae.state_dict(), "quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"(?s)vae\.weights=.*vae\.safetensors.*vae\.use_quant_conv: the config says False"):
        vae_from_config(VAEConfig(**TINY, weights=str(path)))


def test_load_rejects_a_shape_mismatch_naming_the_key(tmp_path):
    state = tiny_vae().state_dict()
    state["decoder.conv_out.bias"] = torch.zeros(4)  # 4 output channels where the model has 3
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"'decoder\.conv_out\.bias' has shape \(4,\), the model expects \(3,\)"):
        vae_from_config(VAEConfig(**TINY, weights=str(tmp_path / "vae.safetensors")))


def test_weights_load_from_a_diffusers_style_folder(tmp_path):
    source = tiny_vae()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.01)
    save_file(source.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = vae_from_config(VAEConfig(**TINY, weights=str(tmp_path)))
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        vae_from_config(VAEConfig(**TINY, weights=str(tmp_path / "nowhere")))


def test_a_bf16_vae_takes_fp32_images_and_latents():
    vae = tiny_vae().to(torch.bfloat16)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1, sample=False)
        decoded = vae.decode(latents.float())
    assert latents.dtype == decoded.dtype == torch.bfloat16
    assert decoded.shape == (1, 3, 32, 32)


def test_logvar_is_clamped_to_diffusers_range():
    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_out.weight.zero_()
        vae.encoder.conv_out.bias[16:] = 50.0  # second half of the channels is the log-variance
        _, high = vae.encode_moments(torch.zeros(1, 3, 16, 16))
        vae.encoder.conv_out.bias[16:] = -50.0
        _, low = vae.encode_moments(torch.zeros(1, 3, 16, 16))
    assert high.unique().tolist() == [20.0]
    assert low.unique().tolist() == [-30.0]
