"""Format detection: what a path is, and how a state dict names its components."""

import pytest

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.formats import (
    COMPONENT,
    DIFFUSERS_MMDIT,
    DIFFUSERS_VAE,
    LDM_VAE,
    LIGHTNING,
    OFFICIAL_MMDIT,
    PIPELINE,
    SINGLE_FILE,
    detect,
    mmdit_naming,
    vae_naming,
)


def test_detect_each_layout(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert detect(tmp_path / "model.safetensors").kind == SINGLE_FILE
    assert detect(tmp_path / "last.ckpt").kind == LIGHTNING
    assert detect(tmp_path / "pipe").kind == PIPELINE
    assert detect(tmp_path / "pipe").subfolder("transformer") == tmp_path / "pipe" / "transformer"
    with pytest.raises(CheckpointError, match="without vae/"):
        detect(tmp_path / "pipe").subfolder("vae")
    assert detect(tmp_path / "vae").kind == COMPONENT
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline folder"):
        detect(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect(tmp_path / "missing")


def test_component_naming_from_keys():
    assert mmdit_naming(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) == (
        OFFICIAL_MMDIT, "model.diffusion_model.")
    assert mmdit_naming(["joint_blocks.0.x_block.attn.qkv.weight"]) == (OFFICIAL_MMDIT, "")
    assert mmdit_naming(["transformer_blocks.0.attn.to_q.weight"]) == (DIFFUSERS_MMDIT, "")
    assert mmdit_naming(["first_stage_model.encoder.conv_in.weight"]) is None
    assert vae_naming(["first_stage_model.encoder.down.0.block.0.conv1.weight"]) == (LDM_VAE, "first_stage_model.")
    assert vae_naming(["encoder.down_blocks.0.resnets.0.conv1.weight"]) == (DIFFUSERS_VAE, "")
    assert vae_naming(["model.diffusion_model.pos_embed"]) is None
