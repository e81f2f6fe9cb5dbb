"""Checkpoints that do not fit fail with the path and the first offending key; damaged files name themselves."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd3train.checkpoint import CheckpointError, load_text_conditioner, load_transformer, load_vae
from sd3train.checkpoint.formats import TRANSFORMER_PREFIX, VAE_PREFIX
from sd3train.checkpoint.vae_ldm import diffusers_to_ldm
from sd3train.model.mmdit import MMDiT
from sd3train.model.vae import VAE


@pytest.fixture
def single_file(tmp_path):
    model = MMDiT(depth=2, hidden_size=64, num_heads=1, in_channels=16, context_dim=32, pooled_dim=16,
                  pos_embed_max_size=8, sample_size=8)
    vae = VAE(block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=32)
    tensors = {TRANSFORMER_PREFIX + key: value for key, value in model.state_dict().items()}
    tensors.update({VAE_PREFIX + key: value for key, value in diffusers_to_ldm(vae.state_dict()).items()})
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_transformer_key_is_named_with_the_file(single_file):
    key = TRANSFORMER_PREFIX + "joint_blocks.1.x_block.mlp.fc2.bias"
    rewrite(single_file, lambda t: t.pop(key))
    message = re.escape(str(single_file)) + f".*missing key.*'{re.escape(key)}'"
    with pytest.raises(CheckpointError, match=message):
        load_transformer(single_file)


def test_unexpected_transformer_key_is_named(single_file):
    key = TRANSFORMER_PREFIX + "joint_blocks.0.x_block.extra.weight"
    rewrite(single_file, lambda t: t.update({key: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=f"unexpected key.*'{re.escape(key)}'"):
        load_transformer(single_file)


def test_mis_shaped_key_is_named_with_both_shapes(single_file):
    key = TRANSFORMER_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias"
    rewrite(single_file, lambda t: t.update({key: torch.zeros(7)}))
    message = r"'model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias' has shape \(7,\)"
    with pytest.raises(CheckpointError, match=message):
        load_transformer(single_file)


def test_missing_vae_key_is_named(single_file):
    rewrite(single_file, lambda t: t.pop(VAE_PREFIX + "decoder.mid.attn_1.proj_out.bias"))
    message = re.escape(str(single_file)) + ".*missing key.*'first_stage_model.decoder.mid.attn_1.proj_out.bias'"
    with pytest.raises(CheckpointError, match=message):
        load_vae(single_file)


def test_missing_key_in_a_diffusers_folder_is_named(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "transformer"
    diffusers.SD3Transformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
                                    sample_size=8).save_pretrained(str(folder))
    rewrite(folder / "diffusion_pytorch_model.safetensors", lambda t: t.pop("transformer_blocks.0.attn.to_k.bias"))
    with pytest.raises(CheckpointError, match=re.escape(str(folder)) + r".*transformer_blocks.0.attn.to_k.bias"):
        load_transformer(folder)


def test_truncated_safetensors_names_the_file(single_file):
    data = single_file.read_bytes()
    single_file.write_bytes(data[: len(data) // 2])
    for load in (load_transformer, load_vae):
        with pytest.raises(CheckpointError, match="cannot read safetensors file " + re.escape(str(single_file))):
            load(single_file)


def test_training_checkpoint_keys_are_named_with_their_prefix(training_checkpoint, tmp_path):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    del checkpoint["state_dict"]["ema.shadow.context_embedder.bias"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="missing key.*'ema.shadow.context_embedder.bias'"):
        load_transformer(tmp_path / "broken.ckpt")


def test_corrupt_training_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint " + re.escape(str(path))):
        load_transformer(path)


def test_file_without_the_component_says_so(single_file, tmp_path):
    with pytest.raises(CheckpointError, match="no text encoders in .*text_encoders.clip_l.transformer."):
        load_text_conditioner(single_file)
    only_vae = tmp_path / "vae.safetensors"
    save_file({key: value for key, value in load_file(str(single_file)).items() if key.startswith(VAE_PREFIX)},
              str(only_vae))
    with pytest.raises(CheckpointError, match="no MM-DiT weights in " + re.escape(str(only_vae))):
        load_transformer(only_vae)


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere.safetensors"))):
        load_vae(tmp_path / "nowhere.safetensors")
