"""diffusers loads our LoRA, end to end as a user runs it (issue 17, acceptance item 2).

A tiny random diffusers SD3 pipeline folder; `sd3train-train experiment=lora_sd35_medium
paths.pretrained=FOLDER` trains a LoRA on it (fp32, CPU, a few steps); `sd3train-export` writes it as
`format=lora_diffusers` and merged as `format=diffusers merge=true`. The folder's pipeline with
`load_lora_weights(file)` computes what sd3train's adapted model (as sd3train-sample restores it)
computes, and what the merged export's transformer computes.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sd3train.checkpoint.training import read_training_checkpoint
from tests.support.processes import BIN, finish, launch
from tests.support.reference_models import relative_error, tiny_sd3_pipeline

diffusers = pytest.importorskip("diffusers")

# The tiny pipeline's sizes on top of the SD3.5-Medium LoRA recipe: 2 blocks of width 64 (2 heads),
# RMS qk norm, no dual attention, 16x16 position table; 2-level VAE (downsampling 2); tiny encoders.
TINY_PIPELINE_SIZES = (
    "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.context_dim=128",
    "model.pooled_dim=96", "model.pos_embed_max_size=16", "model.sample_size=16", "model.dual_attention_layers=[]",
    "model.activation_checkpointing=false", "vae.block_out_channels=[16,32]", "vae.layers_per_block=1",
    "vae.norm_num_groups=8", "text=tiny", "diffusion.sampler.skip_layers=[1]",
)
# rank 4, alpha 8 (scale 2, so the alpha / rank fold into B is exercised); a large lr and a
# short-horizon EMA so that 3 steps move the (EMA) adapter well away from B = 0.
TRAINING = (
    "adapter.rank=4", "adapter.alpha=8", "adapter.targets=[attention,mlp,modulation]",
    "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.accumulate_grad_batches=1",
    "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3", "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1", "optim.lr=1e-2", "optim.warmup_steps=0", "ema.decay=0.5", "ema.every_n_steps=1",
    "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.val_shards=null",
    "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false",
)


@pytest.fixture(scope="module")
def trained(small_shapes, tmp_path_factory):
    """(pipeline folder, the LoRA run's last checkpoint, lora_diffusers file, merged pipeline folder)."""
    root = tmp_path_factory.mktemp("lora_pipeline")
    folder = root / "tiny-sd3"
    with torch.random.fork_rng():  # the text encoders' random init draws from the global generator
        torch.manual_seed(0)
        tiny_sd3_pipeline(shift=3.0)[0].save_pretrained(str(folder))
    finish(launch([str(BIN / "sd3train-train"), "experiment=lora_sd35_medium", f"paths.pretrained={folder}",
                   f"paths.runs_dir={root / 'runs'}", *TINY_PIPELINE_SIZES, *TRAINING,
                   f"data.shards='{small_shapes}/train-{{000000..000003}}.tar'"], root))
    last = root / "runs" / "lora_sd35_medium" / "main" / "checkpoints" / "last"
    lora, merged = root / "lora.safetensors", root / "merged"
    # Both exports at once: each is mostly a fresh interpreter's imports.
    exports = [launch([str(BIN / "sd3train-export"), f"checkpoint={last}", *args], root)
               for args in (["format=lora_diffusers", f"out={lora}"], ["format=diffusers", "merge=true", f"out={merged}"])]
    for process in exports:
        finish(process)
    return folder, last, lora, merged


def transformer_inputs(batch: int = 2, seed: int = 0):
    """(latents, t in [0, 1], context, pooled) at the tiny pipeline's sizes: 16 latent channels on a
    16x16 grid (8x8 patches), 16 + 16 tokens of width 128, pooled 96."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 16, 16, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 32, 128, generator=generator), torch.randn(batch, 96, generator=generator))


def diffusers_output(transformer, latents, t, context, pooled) -> torch.Tensor:
    with torch.no_grad():  # diffusers' timestep is t x 1000
        return transformer(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=t * 1000).sample


def test_diffusers_load_lora_weights_computes_our_adapted_model_and_the_merged_export(trained):
    from sd3train.lit.restore import restore_module

    folder, last, lora, merged = trained
    inputs = transformer_inputs()
    module = restore_module(read_training_checkpoint(last))  # what sd3train-sample does
    with torch.no_grad():
        ours = module.sampling_model(*inputs)

    pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)
    base = diffusers_output(pipeline.transformer, *inputs)
    pipeline.load_lora_weights(str(lora))
    theirs = diffusers_output(pipeline.transformer, *inputs)
    merged_transformer = diffusers.SD3Transformer2DModel.from_pretrained(str(merged / "transformer"),
                                                                         local_files_only=True)
    exported = diffusers_output(merged_transformer.eval(), *inputs)

    errors = {"lora": relative_error(theirs, ours), "merged": relative_error(exported, ours),
              "base": relative_error(base, ours)}
    assert errors["lora"] < 1e-5 and errors["merged"] < 1e-5, errors
    assert errors["base"] > 1e-2, errors  # the LoRA changes the output: the agreement above is not B = 0's


def test_the_exported_lora_moved_every_module_that_has_a_gradient(trained):
    _, _, lora, _ = trained
    tensors = load_file(lora)
    # 2 blocks: each stream's q, k, v, out, 2 MLP and modulation linears, less the last text stream's
    # out and MLP (it stops after qkv); A and B each.
    assert len(tensors) == 2 * (2 * 7 + 7 + 4)
    unmoved = sorted(key for key, value in tensors.items() if ".lora_B." in key and not value.abs().max() > 1e-3)
    # Only the last block's text queries: nothing reads them, so they get no gradient.
    assert unmoved == ["transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"]
