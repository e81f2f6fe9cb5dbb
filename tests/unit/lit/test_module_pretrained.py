"""experiment=finetune_sd35_medium paths.pretrained=FOLDER builds a module that holds the folder's weights.

The folder is a tiny random diffusers SD3 pipeline (tests/support/reference_models.tiny_sd3_pipeline); the
overrides shrink the released SD3.5-Medium architecture to its sizes, as a user finetuning their own
model would set them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd3train.checkpoint import CheckpointError, load_transformer, load_vae
from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.lit.module import SD3LitModule
from tests.support.config import compose_config
from tests.support.reference_models import relative_error, tiny_sd3_pipeline

# The tiny pipeline: 2 blocks of width 64 (2 heads), RMS qk norm, no dual attention, 16x16 position
# table; 2-level VAE (downsampling 2); encoders at conf/text/tiny.yaml widths.
TINY_PIPELINE_SIZES = (
    "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.context_dim=128",
    "model.pooled_dim=96", "model.pos_embed_max_size=16", "model.sample_size=16", "model.dual_attention_layers=[]",
    "vae.block_out_channels=[16,32]", "vae.layers_per_block=1", "vae.norm_num_groups=8",
    "text=tiny", "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "trainer.accelerator=cpu",
    "trainer.precision=32-true", "model.activation_checkpointing=false", "diffusion.sampler.skip_layers=[1]",
)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-sd3"
    tiny_sd3_pipeline(shift=3.0)[0].save_pretrained(str(folder))
    return folder


def finetune_config(folder: Path, *overrides: str):
    return compose_config("experiment=finetune_sd35_medium", f"paths.pretrained={folder}", *TINY_PIPELINE_SIZES,
                          *overrides)


def test_finetune_module_starts_from_every_pretrained_weight(pipeline_folder):
    cfg = finetune_config(pipeline_folder)
    assert cfg.model.weights == cfg.vae.weights == cfg.text.weights == str(pipeline_folder)
    module = SD3LitModule(cfg)

    reference = load_transformer(pipeline_folder)
    ours = module.mmdit.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(ours[key], tensor) for key, tensor in reference.state_dict().items())
    # Trainable, with the training options the experiment asks for, and the EMA starts from the weights.
    assert all(parameter.requires_grad for parameter in module.mmdit.parameters())
    assert module.mmdit.activation_checkpointing == "none"  # overridden above; the experiment turns it on
    assert all(torch.equal(a, b) for a, b in zip(module.ema.shadow.parameters(), module.mmdit.parameters()))
    assert not any(tensor.is_meta for tensor in module.state_dict().values())

    reference_vae = load_vae(pipeline_folder)
    assert all(torch.equal(module.vae.state_dict()[key], tensor) for key, tensor in reference_vae.state_dict().items())
    assert not any(parameter.requires_grad for parameter in module.vae.parameters())

    # The text encoders and the T5 tokenizer came from the folder: the pipeline's own encode_prompt agrees.
    pipeline = tiny_sd3_pipeline(shift=3.0)[0]
    prompts = ["a red circle on a white background"]
    context, pooled = module.text.encode(prompts)
    expected_context, _, expected_pooled, _ = pipeline.encode_prompt(
        prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=16,
    )
    assert relative_error(context, expected_context) < 1e-5
    assert relative_error(pooled, expected_pooled) < 1e-5


def test_finetune_one_training_step_moves_the_pretrained_weights(pipeline_folder):
    module = SD3LitModule(finetune_config(pipeline_folder, "ema.enabled=false"))
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    before = [parameter.detach().clone() for parameter in module.mmdit.parameters()]
    optimizer = module.configure_optimizers()["optimizer"]
    module.optimizers = lambda: optimizer
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = module.training_step({"images": images, "captions": ["a red circle", "a blue square"]}, 0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.mmdit.parameters()))


def test_pretrained_weights_of_another_architecture_fail_naming_each_field(pipeline_folder):
    cfg = finetune_config(pipeline_folder, "model.depth=3", "model.qk_norm=null")
    with pytest.raises(CheckpointError) as error:
        SD3LitModule(cfg)
    message = str(error.value)
    assert f"model.weights={pipeline_folder}" in message
    assert "model.depth: the config says 3" in message and "are 2" in message
    assert "model.qk_norm: the config says None" in message


def test_finetune_checkpoint_holds_the_trained_mmdit_and_names_the_frozen_files(pipeline_folder, tmp_path):
    module = SD3LitModule(finetune_config(pipeline_folder, "ema.enabled=false"))
    with torch.no_grad():
        for parameter in module.mmdit.parameters():
            parameter.add_(0.01)  # "trained": no longer the released weights
    checkpoint = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(checkpoint)  # what Lightning's checkpoint hook does
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    # The frozen VAE and encoders come from the pipeline folder the config names: no copy is saved.
    assert not any(key.startswith(("vae.", "text.")) for key in checkpoint["state_dict"])

    stored = read_training_checkpoint(path).config
    assert stored.model.weights is None  # the checkpoint's own MM-DiT replaces the released one
    assert stored.vae.weights == stored.text.weights == str(pipeline_folder)
    loaded = load_transformer(path)
    assert all(torch.equal(loaded.state_dict()[key], tensor) for key, tensor in module.mmdit.state_dict().items())
