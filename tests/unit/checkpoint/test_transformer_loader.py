"""load_transformer: diffusers folders (parity with diffusers' forward), pipelines, our .ckpt, dtypes."""

import functools

import pytest
import torch

from sd3train.checkpoint import load_transformer
from sd3train.model.mmdit import MMDiT
from tests.support.reference_models import MMDIT_LATENT_SIZES as LATENT_SIZES
from tests.support.reference_models import MMDIT_VARIANTS, diffusers_transformer, relative_error
from tests.support.reference_models import mmdit_inputs as inputs

diffusers = pytest.importorskip("diffusers")



@functools.lru_cache(maxsize=None)
def saved_reference(variant: str, root: str):
    reference = diffusers_transformer(variant)
    folder = f"{root}/{variant}"
    reference.save_pretrained(folder)
    return reference, folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("transformers"))


@pytest.mark.parametrize("height,width", LATENT_SIZES)
@pytest.mark.parametrize("variant", list(MMDIT_VARIANTS))
def test_loaded_diffusers_folder_matches_diffusers_forward(variant, height, width, root):
    reference, folder = saved_reference(variant, root)
    model = load_transformer(folder)
    qk_norm, dual = MMDIT_VARIANTS[variant]
    assert (model.depth, model.hidden_size, model.num_heads) == (3, 64, 2)
    assert model.dual_attention_layers == dual
    assert (model.joint_blocks[0].x_block.attn.ln_q.__class__.__name__ == "RMSNorm") == (qk_norm == "rms")
    latents, t, context, pooled = inputs(height, width)
    with torch.no_grad():
        expected = reference(latents, context, pooled, t * 1000).sample  # diffusers takes 1000 * t
        out = model(latents, t, context, pooled)
    assert expected.abs().mean() > 0.1  # far from the zero init
    assert relative_error(out, expected) < 1e-5  # measured 1.8e-7 to 2.2e-7


def test_pipeline_folder_reads_its_transformer(tiny_pipeline, tiny_pipeline_folder):
    model = load_transformer(tiny_pipeline_folder)
    reference = tiny_pipeline[0].transformer
    assert (model.depth, model.in_channels, model.pos_embed_max_size) == (2, 16, 16)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    context, pooled = torch.randn(1, 32, 128, generator=generator), torch.randn(1, 96, generator=generator)
    t = torch.tensor([0.7])
    with torch.no_grad():
        expected = reference(latents, context, pooled, t * 1000).sample
        assert relative_error(model(latents, t, context, pooled), expected) < 1e-5


def test_dtype_is_applied_to_every_tensor(root):
    _, folder = saved_reference("sd3.5-medium", root)
    model = load_transformer(folder, dtype=torch.bfloat16)
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}
    assert not model.training


def test_training_checkpoint_gives_the_ema_weights(training_checkpoint):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    model = load_transformer(training_checkpoint)
    assert isinstance(model, MMDiT) and model.depth == 2
    loaded = model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, checkpoint["state_dict"]["ema.shadow." + key]), key
    trained = checkpoint["state_dict"]["mmdit.final_layer.linear.weight"]
    assert not torch.equal(loaded["final_layer.linear.weight"], trained)


def test_training_checkpoint_without_ema_gives_the_trained_weights(training_checkpoint, tmp_path):
    checkpoint = torch.load(training_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ema.")}
    torch.save(checkpoint, tmp_path / "no_ema.ckpt")
    model = load_transformer(tmp_path / "no_ema.ckpt")
    expected = checkpoint["state_dict"]["mmdit.final_layer.linear.weight"]
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], expected)
