"""Step time, achieved TFLOP/s and model FLOP utilisation (MFU), logged at logging steps.

At every `trainer.log_every_n_steps`-th optimizer step the callback logs, to every logger
(metrics.csv and W&B, beside the loss):

    train/step_time_ms      wall time per optimizer step since the last log (validation excluded)
    train/tflops_per_sec    model FLOPs of those steps / that time, per device
    train/mfu               train/tflops_per_sec / the device's dense peak at the training precision
                            (sd3train/runtime/peak.py), or / `trainer.peak_tflops` when set; not
                            logged on a device without a known peak (the CPU, unless it is set)

FLOPs are the analytic count of `sd3train.model.flops.training_step_flops` (3x the forward,
checked against torch's FlopCounterMode) for each micro-batch's real shapes: the latent grid
is the cached latent's when the batch is from the precompute cache, else the image size / the
VAE's downsampling; text tokens are CLIP-L's + T5's max_length. Checkpoints and previews written
inside a window count in its time, as they hold up training.

Only shapes are read on ordinary steps, never tensor values, so the callback adds no host-device
synchronisation there; at a logging step it synchronises the device before reading the clock
(else the clock would stop before the queued kernels ran), and again around validation.

    callback = StepThroughput.from_config(cfg)            # sd3train/lit/trainer.py adds it
Tests: `python -m pytest tests/unit/lit/test_throughput.py -q`.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import lightning as L
import torch

from sd3train.config.schema import ModelConfig, TrainConfig
from sd3train.model.flops import training_step_flops
from sd3train.runtime.peak import matmul_precision, peak_tflops


class StepThroughput(L.Callback):
    """Logs train/step_time_ms, train/tflops_per_sec and train/mfu every `log_every_n_steps` steps.

    `clock` returns seconds (time.perf_counter; a test passes a fake one). `peak_tflops` None
    looks the device up when training starts.
    """

    def __init__(self, model: ModelConfig, text_tokens: int, vae_downsample: int, log_every_n_steps: int,
                 peak_tflops: Optional[float] = None, clock: Callable[[], float] = time.perf_counter):
        self.model = model
        self.text_tokens = text_tokens
        self.vae_downsample = vae_downsample
        self.every_n_steps = max(1, log_every_n_steps)
        self.configured_peak = peak_tflops
        self.peak: Optional[float] = peak_tflops
        self.clock = clock
        self._flops_by_shape: dict[tuple[int, int, int], int] = {}
        self._window_start: Optional[float] = None
        self._paused_at: Optional[float] = None
        self._window_flops = 0
        self._window_steps = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, clock: Callable[[], float] = time.perf_counter) -> "StepThroughput":
        return cls(
            cfg.model,
            text_tokens=cfg.text.clip_l.max_length + cfg.text.t5.max_length,
            vae_downsample=2 ** (len(cfg.vae.block_out_channels) - 1),
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            peak_tflops=cfg.trainer.peak_tflops,
            clock=clock,
        )

    # ------------------------------------------------------------------ arithmetic
    def batch_flops(self, batch: dict) -> int:
        """Training FLOPs of one micro-batch, from its tensors' shapes only."""
        if "latent_mean" in batch:
            size, _, latent_h, latent_w = batch["latent_mean"].shape  # (B, C, h, w)
        else:
            size, _, height, width = batch["images"].shape  # (B, 3, H, W)
            latent_h, latent_w = height // self.vae_downsample, width // self.vae_downsample
        key = (int(size), int(latent_h), int(latent_w))
        if key not in self._flops_by_shape:  # a handful of shapes (buckets) over a whole run
            self._flops_by_shape[key] = training_step_flops(self.model, *key, self.text_tokens)
        return self._flops_by_shape[key]

    def window_metrics(self, seconds: float, steps: int, flops: int) -> dict[str, float]:
        """The logged values for `steps` optimizer steps of `flops` model FLOPs in `seconds`."""
        tflops_per_sec = flops / seconds / 1e12
        metrics = {"train/step_time_ms": 1e3 * seconds / steps, "train/tflops_per_sec": tflops_per_sec}
        if self.peak is not None:
            metrics["train/mfu"] = tflops_per_sec / self.peak
        return metrics

    # ----------------------------------------------------------------------- hooks
    @staticmethod
    def _synchronize(pl_module) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.configured_peak is None and pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            self.peak = peak_tflops(name, matmul_precision(str(trainer.precision)))
        self._synchronize(pl_module)
        self._window_start = self.clock()
        self._window_flops = self._window_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._window_start is None:
            return
        self._window_flops += self.batch_flops(batch)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # a micro-batch inside an accumulated step: the optimizer has not stepped
        self._window_steps += 1
        if trainer.global_step % self.every_n_steps:
            return
        self._synchronize(pl_module)
        now = self.clock()
        seconds = now - self._window_start
        if seconds > 0:
            size = batch["latent_mean" if "latent_mean" in batch else "images"].shape[0]
            pl_module.log_dict(self.window_metrics(seconds, self._window_steps, self._window_flops),
                               batch_size=size)
        self._window_start = now
        self._window_flops = self._window_steps = 0

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._window_start is not None:
            self._synchronize(pl_module)
            self._paused_at = self.clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation's time is left out of the window it interrupts.
        if self._window_start is not None and self._paused_at is not None:
            self._synchronize(pl_module)
            self._window_start += self.clock() - self._paused_at
            self._paused_at = None
