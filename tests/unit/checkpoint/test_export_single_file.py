"""Single-file export: diffusers' single-file loaders read it (same outputs), ours reads it back exactly,
and single file -> ours -> single file is the identity."""

import json

import pytest
import torch
from safetensors import safe_open

from sd3train.checkpoint import load_text_conditioner, load_transformer, load_vae
from sd3train.checkpoint.architecture import mmdit_config_of, vae_config_of
from sd3train.checkpoint.export_diffusers import transformer_config, vae_config
from sd3train.checkpoint.export_single_file import export_single_file
from sd3train.checkpoint.files import write_json
from sd3train.model.mmdit import MMDiT
from sd3train.model.vae import VAE
from tests.support.reference_models import perturb, relative_error

diffusers = pytest.importorskip("diffusers")


def random_models():
    transformer = perturb(MMDiT(depth=3, hidden_size=64, num_heads=2, in_channels=16, context_dim=96, pooled_dim=48,
                                pos_embed_max_size=16, sample_size=16, qk_norm="rms", dual_attention_layers=(0,)))
    vae = perturb(VAE(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8), seed=2, std=0.05)
    return transformer.eval(), vae.eval()


def read_all(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    transformer, vae = random_models()
    path = export_single_file(root / "model.safetensors", transformer, vae, shift=3.0)
    # diffusers needs a diffusers config beside a single file when it may not reach the hub.
    write_json(transformer_config(mmdit_config_of(transformer)), root / "config" / "transformer" / "config.json")
    write_json(vae_config(vae_config_of(vae)), root / "config" / "vae" / "config.json")
    return transformer, vae, path, root / "config"


def test_layout_has_stability_prefixes_and_metadata(exported):
    transformer, _, path, _ = exported
    tensors, metadata = read_all(path)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in tensors
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in tensors
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert not any(key.startswith("text_encoders.") for key in tensors)
    stored = json.loads(metadata["sd3train"])
    assert stored["transformer"]["num_heads"] == 2 and stored["transformer"]["sample_size"] == 16
    assert stored["vae"]["norm_num_groups"] == 8 and stored["scheduler"]["shift"] == 3.0


def test_diffusers_single_file_loaders_give_our_outputs(exported):
    transformer, vae, path, config = exported
    reference = diffusers.SD3Transformer2DModel.from_single_file(
        str(path), config=str(config), subfolder="transformer", local_files_only=True
    )
    generator = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 16, 12, 20, generator=generator), torch.rand(2, generator=generator)
    context, pooled = torch.randn(2, 7, 96, generator=generator), torch.randn(2, 48, generator=generator)
    with torch.no_grad():
        expected = reference(latents, context, pooled, t * 1000).sample
        assert relative_error(transformer(latents, t, context, pooled), expected) < 1e-5  # measured 2e-7

    reference_vae = diffusers.AutoencoderKL.from_single_file(
        str(path), config=str(config), subfolder="vae", local_files_only=True
    )
    images = torch.rand(2, 3, 16, 12, generator=generator) * 2 - 1
    with torch.no_grad():
        mean = reference_vae.encode(images).latent_dist.mean
        assert relative_error(vae.encode(images, sample=False), (mean - 0.0609) * 1.5305) < 1e-5
        raw = torch.randn(2, 16, 8, 6, generator=generator)
        assert relative_error(vae.decode((raw - 0.0609) * 1.5305), reference_vae.decode(raw).sample) < 1e-5


def test_our_loaders_read_back_identical_tensors(exported):
    transformer, vae, path, _ = exported
    loaded, loaded_vae = load_transformer(path), load_vae(path)
    assert loaded.num_heads == 2 and loaded.dual_attention_layers == (0,)
    for original, back in ((transformer, loaded), (vae, loaded_vae)):
        state, back_state = original.state_dict(), back.state_dict()
        assert state.keys() == back_state.keys()
        assert all(torch.equal(state[key], back_state[key]) for key in state)


def test_round_trip_single_file_ours_single_file_is_identity(exported, tmp_path):
    _, _, path, _ = exported
    again = export_single_file(tmp_path / "again.safetensors", load_transformer(path), load_vae(path), shift=3.0)
    (first, first_meta), (second, second_meta) = read_all(path), read_all(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) and first[key].dtype == second[key].dtype for key in first)
    assert first_meta == second_meta


def test_text_encoders_round_trip_through_the_single_file(tiny_pipeline_folder, tmp_path):
    transformer, vae = random_models()
    text = load_text_conditioner(tiny_pipeline_folder, t5_max_length=12)
    path = export_single_file(tmp_path / "with_text.safetensors", transformer, vae, text, shift=3.0)
    tensors, _ = read_all(path)
    assert "text_encoders.t5xxl.transformer.shared.weight" in tensors
    assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" in tensors
    assert "text_encoders.clip_g.transformer.text_projection.weight" in tensors
    back = load_text_conditioner(path, t5_tokenizer=tiny_pipeline_folder / "tokenizer_3")
    assert back.tokenizers["t5"].max_length == 12 and back.tokenizers["clip_g"].pad_id == 0
    prompts = ["a red circle on a white background", ""]
    assert all(torch.equal(a, b) for a, b in zip(back.encode(prompts), text.encode(prompts)))
