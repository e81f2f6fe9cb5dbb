"""LoRA training on a base checkpoint (`adapter=lora model.weights=...`): only the adapter trains,
averages and is checkpointed (with the base's digest); the base stays as loaded; a resume continues
and refuses another base, naming both; the export formats read the run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd3train.checkpoint.errors import CheckpointError
from sd3train.checkpoint.files import read_lightning_checkpoint
from sd3train.checkpoint.training import read_training_checkpoint
from sd3train.export import export
from sd3train.train import fit, run_dir_of
from sd3train.tools.make_concept import write_concept_folder
from tests.support.checkpoints import write_training_checkpoint
from tests.support.config import adapter_run_config

ADAPTER = ["adapter=lora", "adapter.rank=4", "adapter.alpha=8", "adapter.targets=[attention,mlp]"]


def adapter_config(shapes: Path, root: Path, base: Path, *overrides: str):
    return adapter_run_config(shapes, root, base, ADAPTER, *overrides)


@pytest.fixture(scope="module")
def run(small_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "base").mkdir()
    base = write_training_checkpoint(root / "base")
    cfg = adapter_config(small_shapes, root, base, "trainer.max_steps=4")
    fit(cfg)
    return root, base, cfg


def test_only_the_adapter_trains_and_is_checkpointed(run):
    root, base, cfg = run
    checkpoint = read_lightning_checkpoint(run_dir_of(cfg) / "checkpoints" / "last")
    state = checkpoint["state_dict"]
    trained = [key for key in state if key.startswith(("mmdit.", "ema.shadow."))]
    assert trained and all(".lora_A." in key or ".lora_B." in key for key in trained)
    # Attention and MLP of both streams of 2 blocks, less the last text stream's proj and MLP:
    # 8 + 5 modules, A and B each, for the weights and the EMA.
    assert len(trained) == 2 * 2 * 13
    adapter_numel = sum(state[key].numel() for key in trained)
    base_numel = sum(value.numel() for key, value in torch.load(base, weights_only=False)["state_dict"].items()
                     if key.startswith("mmdit."))
    assert adapter_numel < 0.1 * base_numel
    assert checkpoint["sd3train_adapter_base"]["weights"] == str(base)
    # The adapter moved (B starts at zero), in the weights and in the EMA.
    for prefix in ("mmdit.", "ema.shadow."):
        b = [state[key] for key in trained if key.startswith(prefix) and ".lora_B." in key]
        assert any(tensor.abs().sum() > 0 for tensor in b), prefix
    optimizer = checkpoint["optimizer_states"][0]
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == 13 * 2


def test_the_base_is_what_model_weights_gave(run):
    root, base, cfg = run
    from sd3train.checkpoint.transformer_loader import adapted_transformer
    from sd3train.model.adapters import base_state_dict

    adapted = adapted_transformer(read_training_checkpoint(run_dir_of(cfg) / "checkpoints" / "last"))
    original = read_training_checkpoint(base).transformer()  # the EMA weights model.weights loads
    got = base_state_dict(adapted)
    assert got.keys() == original.keys()
    assert all(torch.equal(got[key], original[key]) for key in original)


def test_a_resume_continues_and_another_base_is_refused_naming_both(run, small_shapes, tmp_path):
    root, base, cfg = run
    fit(adapter_config(small_shapes, root, base, "trainer.max_steps=6"))
    with open(run_dir_of(cfg) / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == list(range(6))  # 0..3, then 4..5 after the resume
    other = tmp_path / "other.ckpt"
    checkpoint = torch.load(base, weights_only=False)
    for key in checkpoint["state_dict"]:
        if key.startswith("ema.shadow."):
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 0.01
            break
    torch.save(checkpoint, other)
    with pytest.raises(CheckpointError) as error:
        fit(adapter_config(small_shapes, root, other, "trainer.max_steps=8"))
    assert str(base) in str(error.value) and str(other) in str(error.value)


@pytest.mark.parametrize("layout", ["lora_kohya", "lora_diffusers"])
def test_the_lora_exports_hold_the_ema_adapter(run, tmp_path, layout):
    _, _, cfg = run
    out = export({"checkpoint": str(run_dir_of(cfg) / "checkpoints" / "last"), "format": layout,
                  "out": str(tmp_path / "lora.safetensors")})
    tensors = load_file(out)
    if layout == "lora_kohya":
        assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight" in tensors
        assert float(tensors["lora_unet_joint_blocks_1_context_block_attn_qkv.alpha"]) == 8.0
    else:
        assert {"transformer.transformer_blocks.1.attn.add_q_proj.lora_A.weight",
                "transformer.transformer_blocks.0.ff.net.2.lora_B.weight"} <= set(tensors)


def test_a_merged_export_needs_merge_true(run, tmp_path):
    _, _, cfg = run
    args = {"checkpoint": str(run_dir_of(cfg) / "checkpoints" / "last"), "format": "single_file",
            "out": str(tmp_path / "merged.safetensors")}
    with pytest.raises(CheckpointError, match="merge=true"):
        export(args)
    merged = load_file(export({**args, "merge": True}))
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in merged
    assert not any("lora" in key for key in merged)


def test_sampling_restores_the_base_and_the_ema_adapter(run):
    _, _, cfg = run
    from sd3train.checkpoint.transformer_loader import adapted_transformer
    from sd3train.lit.restore import restore_module

    checkpoint = read_training_checkpoint(run_dir_of(cfg) / "checkpoints" / "last")
    module = restore_module(checkpoint)  # what sd3train-sample does
    expected = adapted_transformer(checkpoint)
    generator = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 16, 8, 8, generator=generator), torch.rand(2, generator=generator)
    context, pooled = torch.randn(2, 5, 128, generator=generator), torch.randn(2, 96, generator=generator)
    with torch.no_grad():
        assert torch.equal(module.sampling_model(latents, t, context, pooled), expected(latents, t, context, pooled))


@pytest.mark.parametrize("layout", ["lora_kohya", "lora_diffusers"])
def test_an_exported_lora_loads_back_as_the_adapter_to_start_from(run, small_shapes, tmp_path, layout):
    _, base, cfg = run
    from sd3train.checkpoint.transformer_loader import adapted_transformer
    from sd3train.lit.module import SD3LitModule

    last = run_dir_of(cfg) / "checkpoints" / "last"
    exported = export({"checkpoint": str(last), "format": layout, "out": str(tmp_path / "lora.safetensors")})
    module = SD3LitModule(adapter_config(small_shapes, tmp_path, base, f"model.adapter_weights={exported}"))
    expected = adapted_transformer(read_training_checkpoint(last))  # the EMA adapter, as exported
    generator = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 16, 8, 8, generator=generator), torch.rand(2, generator=generator)
    context, pooled = torch.randn(2, 5, 128, generator=generator), torch.randn(2, 96, generator=generator)
    with torch.no_grad():
        got, want = module.mmdit.eval()(latents, t, context, pooled), expected(latents, t, context, pooled)
    if layout == "lora_kohya":
        assert torch.equal(got, want)  # the same tensors
    else:  # alpha / rank folded into B and out again: rounding only
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # about 40 s: two 2-process runs
def test_lora_under_fsdp_trains_as_under_ddp(small_shapes, tmp_path):
    from tests.support.processes import train_under_fsdp_and_ddp

    (tmp_path / "base").mkdir()
    base = write_training_checkpoint(tmp_path / "base")
    runs = train_under_fsdp_and_ddp(tmp_path, [
        "model.depth=2", f"model.weights={base}", *ADAPTER, "trainer.precision=bf16-mixed", "data.batch_size=4",
        "data.num_workers=0", "data.val_shards=null", "eval.prompts=[]", "eval.samples_per_caption=0",
        "logger.wandb=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.max_steps=4",
        f"data.shards='{small_shapes}/train-{{000000..000003}}.tar'"])
    (fsdp_losses, fsdp), (ddp_losses, ddp) = runs["fsdp"], runs["ddp"]
    assert len(fsdp_losses) == 4 and fsdp_losses == pytest.approx(ddp_losses, rel=1e-3)
    adapter = [key for key in ddp if key.startswith(("mmdit.", "ema.shadow."))]
    assert adapter and all(".lora_" in key for key in adapter) and set(adapter) <= set(fsdp)
    for key in adapter:
        torch.testing.assert_close(fsdp[key].float(), ddp[key].float(), rtol=1e-2, atol=1e-4)


@pytest.mark.slow
def test_prior_preservation_under_fsdp_draws_every_class_image_once(small_shapes, tmp_path):
    """Two FSDP2 ranks draw the class images (collective forwards: the rank with fewer draws a
    stand-in it does not keep), 5 images split 3 + 2, each written once, then train on them."""
    from tests.support.processes import BIN, finish, launch

    (tmp_path / "base").mkdir()
    base = write_training_checkpoint(tmp_path / "base")
    folder = tmp_path / "instance"
    write_concept_folder(folder, count=4, size=32)
    classes = tmp_path / "class"
    finish(launch([str(BIN / "sd3train-train"), "experiment=tiny_cpu", "strategy=fsdp", "trainer.devices=2",
                   "model.depth=2", f"model.weights={base}", *ADAPTER, "data=folder", f"data.path={folder}",
                   f"data.class_images={classes}", "data.class_prompts=['a red circle on a white background',"
                   "'a blue square on a black background']", "data.num_class_images=5",
                   "diffusion.sampler.num_steps=2", "data.resolution=32", "data.batch_size=4", "data.num_workers=0",
                   "data.val_shards=null", "data.cache_latents=false", "eval.prompts=[]",
                   "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
                   "trainer.log_every_n_steps=1", "trainer.max_steps=2"], tmp_path))
    assert sorted(path.name for path in classes.iterdir()) == sorted(
        f"class-{index:05d}.{suffix}" for index in range(5) for suffix in ("png", "txt"))
    assert (classes / "class-00003.txt").read_text() == "a blue square on a black background"
    with open(tmp_path / "runs" / "tiny_cpu" / "main" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss_prior")]
    assert len(rows) == 2 and any(float(row["train/loss_prior"]) > 0 for row in rows)  # class images were in batches
