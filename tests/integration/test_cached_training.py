"""Training on a precompute cache: the same loss as online on the same samples, and it trains end to end.

The dataset is the shapes dataset with a synthetic caption for every other sample, so the cached
path also has to pick the synthetic caption's embeddings exactly when the online path picks it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from sd3train.curation.precompute import main as precompute
from sd3train.data.cache_format import TEXT_OUTPUTS
from sd3train.data.datamodule import ShardDataModule
from sd3train.data.tar_reader import RawSample, read_shard
from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards
from sd3train.diffusion.timesteps import sample_timesteps
from sd3train.lit.module import SD3LitModule
from sd3train.model.embeddings import random_crop_offsets
from sd3train.model.text_encoders import TextConditioner
from sd3train.runtime.rng import step_generator
from sd3train.tools.make_shapes import build_shapes
from tests.support.config import tiny_config

TRAIN = "train-{000000..000003}.tar"
SMALL = ("data.resolution=32", "model.depth=1", "data.batch_size=8", "data.synthetic_caption_key=syn.txt")
STEPS = 3  # batches compared, one per step


def _with_synthetic_captions(shapes: Path, out: Path) -> None:
    """The shapes shards again, every other sample with a `syn.txt` caption (same images, same keys)."""
    for split, shards in (("train", 4), ("val", 1)):
        samples = []
        for index in range(shards):
            for raw in read_shard(str(shapes / f"{split}-{index:06d}.tar")):
                assert isinstance(raw, RawSample)
                caption = raw.fields["txt"].decode()
                sidecars = {"syn.txt": f"a picture of {caption}".encode()} if int(raw.key[-3:]) % 2 else None
                samples.append(ShardSample(raw.key, EncodedImage(raw.fields["png"], "png"), caption, None, sidecars))
        write_shards(samples, out, prefix=split, samples_per_shard=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cached_training")
    build_shapes(root / "shapes", train=64, val=8, size=32, samples_per_shard=16)
    _with_synthetic_captions(root / "shapes", root / "source")
    for dtype in ("fp32", "bf16"):
        assert precompute([
            "--out", str(root / f"cache-{dtype}"), "--dtype", dtype, "--batch-size", "8", "experiment=tiny_cpu",
            *SMALL, f"data.shards='{root}/source/{TRAIN}::{root}/source/val-000000.tar'",
        ]) == 0
    return root


def _config(root: Path, cache: str | None = None, *overrides: str):
    cached = [] if cache is None else [
        "data.cached=true", f"data.shards='{root}/{cache}/{TRAIN}'",
        f"data.val_shards='{root}/{cache}/val-000000.tar'",
    ]
    return tiny_config(root / "source", root / "runs", *SMALL, *cached, *overrides)


def _step_loss(module: SD3LitModule, batch: dict, step: int) -> float:
    """`training_step`'s loss (without logging) for the step's generator."""
    cfg = module.cfg
    generator = step_generator(cfg.trainer.seed, step, 0, "train")
    latents, context, pooled = module._encode_batch(batch, generator)
    diffusion = cfg.diffusion
    t = sample_timesteps(
        latents.shape[0], diffusion.density, generator, logit_mean=diffusion.logit_mean,
        logit_std=diffusion.logit_std, mode_scale=diffusion.mode_scale, shift=module.train_shift,
    )
    noise = torch.randn(latents.shape, generator=generator)
    pos_offset = None
    if cfg.model.pos_embed_random_crop:
        patch = module.mmdit.patch_size
        pos_offset = random_crop_offsets(
            latents.shape[0], latents.shape[-2] // patch, latents.shape[-1] // patch,
            module.mmdit.pos_embed_max_size, generator, region=cfg.model.pos_embed_crop_region,
        )
    with torch.no_grad():
        return module._flow_loss(latents, context, pooled, t, noise, pos_offset).mean().item()


def _batches(cfg) -> list[dict]:
    batches = iter(ShardDataModule(cfg.data, seed=cfg.trainer.seed).train_dataloader())
    return [next(batches) for _ in range(STEPS)]


def test_cached_loss_equals_online_loss(data):
    online_cfg = _config(data)
    torch.manual_seed(0)
    module = SD3LitModule(online_cfg).eval()
    online = _batches(online_cfg)
    synthetic = [flag for batch in online for flag in batch["synthetic_captions"]]
    assert any(synthetic) and not all(synthetic)  # both kinds of caption are compared
    online_losses = [_step_loss(module, batch, step) for step, batch in enumerate(online)]
    differences = {}
    for dtype, tolerance in (("fp32", 1e-5), ("bf16", 1e-2)):
        cached = _batches(_config(data, f"cache-{dtype}"))
        for online_batch, cached_batch in zip(online, cached):
            assert "images" in online_batch and cached_batch["keys"] == online_batch["keys"]
            assert cached_batch["captions"] == online_batch["captions"]
            assert cached_batch["synthetic_captions"] == online_batch["synthetic_captions"]
            assert "images" not in cached_batch and cached_batch["latent_mean"].dtype == {
                "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        cached_losses = [_step_loss(module, batch, step) for step, batch in enumerate(cached)]
        relative = [abs(c - o) / abs(o) for c, o in zip(cached_losses, online_losses)]
        differences[dtype] = max(relative)
        print(f"{dtype} cache: online {online_losses}, cached {cached_losses}, max relative difference "
              f"{max(relative):.2e}")
        assert max(relative) < tolerance, (dtype, online_losses, cached_losses)
    assert differences["fp32"] <= differences["bf16"]


def test_fit_trains_on_the_cache(data):
    from sd3train.train import fit, run_dir_of

    cfg = _config(data, "cache-bf16", f"trainer.max_steps={STEPS}", "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=1",
                  "eval.prompts=[]", "eval.samples_per_caption=0", "logger.wandb=false", "trainer.progress_bar=false",
                  "run_name=cached")
    assert cfg.data.cached
    fit(cfg)
    run_dir = run_dir_of(cfg)
    assert (run_dir / "checkpoints" / "last" / "COMPLETE").is_file()
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    train_losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    val_losses = [float(row["val/loss"]) for row in rows if row.get("val/loss")]
    assert train_losses and all(math.isfinite(loss) for loss in train_losses)
    assert len(val_losses) == 1 and math.isfinite(val_losses[0])
    checkpoint = torch.load(run_dir / "checkpoints" / "last" / "checkpoint.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS


def test_adapted_text_encoders_run_live_on_the_cache(data):
    """adapter.text_encoders on the cache: the adapted CLIP encoders run on the cached captions, T5
    comes from the cache, and the loss is the online one."""
    from tests.support.checkpoints import write_training_checkpoint

    (data / "base").mkdir(exist_ok=True)
    base = write_training_checkpoint(data / "base", *SMALL)
    adapter = (f"model.weights={base}", "adapter=lora", "adapter.text_encoders=[clip_l,clip_g]")
    modules = []
    for cache in (None, "cache-fp32"):
        torch.manual_seed(0)
        module = SD3LitModule(_config(data, cache, *adapter)).eval()
        generator = torch.Generator().manual_seed(1)  # B away from zero, so the adapters change the outputs
        with torch.no_grad():
            for _, parameter in sorted(module.text.named_parameters()):
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        modules.append(module)
    online, cached = modules
    assert not hasattr(cached.text, "t5") and set(cached.text.tokenizers) == {"clip_l", "clip_g"}
    online_batches, cached_batches = _batches(_config(data)), _batches(_config(data, "cache-fp32"))
    online_losses = [_step_loss(online, batch, step) for step, batch in enumerate(online_batches)]
    cached_losses = [_step_loss(cached, cached.prepare_batch(batch), step) for step, batch in enumerate(cached_batches)]
    assert cached_losses == pytest.approx(online_losses, rel=1e-5)
    # T5's part of the context is the cache's own; the CLIP part and the pooled vector are not.
    batch = cached_batches[0]
    _, context, pooled = cached._encode_batch(batch, generator=None)
    cached_context, cached_pooled = TextConditioner.assemble({name: batch[name] for name in TEXT_OUTPUTS})
    clip_tokens = cached.cfg.text.clip_l.max_length
    assert torch.equal(context[:, clip_tokens:], cached_context[:, clip_tokens:])
    assert (pooled - cached_pooled).norm() > 1e-2 * cached_pooled.norm()
    # And the adapters train through them: the step's context carries their gradients.
    _, context, pooled = cached.train()._encode_batch(batch, step_generator(cached.cfg.trainer.seed, 0, 0, "train"))
    (context.square().sum() + pooled.square().sum()).backward()
    adapters = [parameter for parameter in cached.text.parameters() if parameter.requires_grad]
    assert adapters and all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in adapters)
