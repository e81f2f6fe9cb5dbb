"""The `step` variant of `python -m sd3train.bench.train_step`: the project's own training step.

`SD3LitModule.training_step` under a real Lightning Trainer from `sd3train.lit.trainer.build_trainer`
(the optimizer, the non-finite guard, gradient clipping, the EMA, metric logging to metrics.csv,
the throughput callback: all as `sd3train-train` runs them), fed one fixed batch in the precompute
cache's layout (`data.cached=true`: latent mean/std and the text encoders' outputs), so the
training device holds the MM-DiT, its EMA copy and the VAE decoder, and no text encoder. The
config is the benchmark's model with the tiny VAE and the tiny text encoders widened to the
MM-DiT's context and pooled widths (they are never built: with the cache only previews need them).
Checkpoints are left out (writing them is I/O, not the step), and so are validation and previews.

Each step is timed from the end of the previous one (the device synchronised at both ends), so
Lightning's own work between steps, the batch's copy to the device and the logging steps count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sd3train.bench.step_loops import LATENT_DOWNSAMPLE, SEED
from sd3train.config.compose import compose_config
from sd3train.config.schema import ModelConfig, TrainConfig
from sd3train.data.cache_format import TEXT_OUTPUTS
from sd3train.lit.checkpointing import AtomicCheckpoint
from sd3train.lit.module import SD3LitModule
from sd3train.lit.trainer import build_trainer

CLIP_MAX_LENGTH = 77
CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 64  # conf/text/tiny.yaml's hidden sizes: never built here


def _yaml_value(value) -> str:
    """A Hydra override value for a config field."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(item) for item in value) + "]"
    return str(value)


def text_lengths(text_tokens: int) -> tuple[int, int]:
    """(CLIP tokens, T5 tokens) adding up to `text_tokens`: as many CLIP tokens as half, at most 77."""
    clip = min(CLIP_MAX_LENGTH, text_tokens // 2)
    return clip, text_tokens - clip


def step_config(model: ModelConfig, args: argparse.Namespace, runs_dir: Path) -> TrainConfig:
    """The composed, validated TrainConfig the step variant trains with."""
    clip_tokens, t5_tokens = text_lengths(args.text_tokens)
    clip_l_projection = model.pooled_dim * 3 // 8  # SD3: 768 of 2048
    height, width = args.image_size
    overrides = [f"model.{field.name}={_yaml_value(getattr(model, field.name))}"
                 for field in dataclasses.fields(model) if field.name != "weights"]
    overrides += [
        "vae=tiny", "text=tiny", f"text.t5.d_model={model.context_dim}",
        f"text.clip_l.projection_dim={clip_l_projection}",
        f"text.clip_g.projection_dim={model.pooled_dim - clip_l_projection}",
        f"text.clip_l.max_length={clip_tokens}", f"text.clip_g.max_length={clip_tokens}",
        f"text.t5.max_length={t5_tokens}",
        # Never read: the batches are made here. Square side for validation (and the shift).
        "data=cached", "data.shards=/nonexistent/cache-{000000..000001}.tar", f"data.resolution={max(height, width)}",
        f"data.batch_size={args.batch}", "data.num_workers=0",
        "trainer.accelerator=" + ("gpu" if args.device == "cuda" else "cpu"), "trainer.devices=1",
        "trainer.precision=" + ("bf16-mixed" if args.dtype == "bf16" else "32-true"),
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.progress_bar=false",
        f"trainer.checkpoint_every_n_steps={args.warmup + args.steps + 1}", f"trainer.seed={SEED}",
        "logger.wandb=false", "eval.prompts=[]", "eval.samples_per_caption=0",
        f"paths.runs_dir={runs_dir}", "experiment_name=bench", "run_name=step",
    ]
    if args.peak_tflops is not None:
        overrides.append(f"trainer.peak_tflops={args.peak_tflops}")
    return compose_config(overrides)


def cached_batch(cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """One batch as the cache's data loader yields it: bf16 latent moments and text outputs."""
    generator = torch.Generator().manual_seed(SEED)
    size = args.batch
    height, width = (side // LATENT_DOWNSAMPLE for side in args.image_size)
    text = cfg.text
    shapes = {
        "latent_mean": (size, cfg.model.in_channels, height, width),
        "clip_l_hidden": (size, text.clip_l.max_length, text.clip_l.hidden_size),
        "clip_l_pooled": (size, text.clip_l.projection_dim),
        "clip_g_hidden": (size, text.clip_g.max_length, text.clip_g.hidden_size),
        "clip_g_pooled": (size, text.clip_g.projection_dim),
        "t5_hidden": (size, text.t5.max_length, text.t5.d_model),
    }
    assert set(TEXT_OUTPUTS) <= set(shapes), "the cache's text outputs changed: update the benchmark"
    batch = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()}
    batch["latent_std"] = torch.full_like(batch["latent_mean"], 0.05)
    batch["keys"] = [f"{index:06d}" for index in range(size)]
    return batch


class RepeatBatch(IterableDataset):
    """The same batch forever (the Trainer stops at max_steps)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(L.Callback):
    """Seconds of each optimizer step, from the end of the previous one (the start of training for the first)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._last = 0.0

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module)
        self.seconds.append(now - self._last)
        self._last = now


def run_step(model: ModelConfig, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds per timed step of the project's training step (after `args.warmup` untimed ones)."""
    warnings.filterwarnings("ignore", module="lightning")  # data-loader worker and eval-mode advice
    with tempfile.TemporaryDirectory(prefix="sd3train-bench-") as runs_dir:
        cfg = step_config(model, args, Path(runs_dir))
        torch.manual_seed(SEED)
        # Built on the device: a 2B-parameter initialisation on the CPU takes a while.
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            module = SD3LitModule(cfg)
        timer = StepTimer()
        trainer, _ = build_trainer(cfg, Path(runs_dir) / "run", extra_callbacks=(timer,))
        trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, AtomicCheckpoint)]
        loader = DataLoader(RepeatBatch(cached_batch(cfg, args)), batch_size=None, pin_memory=device.type == "cuda")
        trainer.fit(module, train_dataloaders=loader)
    return timer.seconds[args.warmup:]
