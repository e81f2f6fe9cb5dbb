"""Callbacks: throughput and data metrics, a step-based progress bar, previews, colour and shape evaluation."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from sd3train.config.schema import SamplerConfig
from sd3train.eval.shapes_suite import adherence_metrics, evaluation_prompts
from sd3train.inference import decode_to_uint8, generate_latents, write_grid, write_samples


class DataMetrics(L.Callback):
    """Throughput and the data pipeline's health, every `every_n_steps` (the logging steps: logging
    a number moves it to the device, so ordinary steps log nothing): train/samples_per_sec over the
    window since the last log (all ranks, from the real batch sizes), data/wait_fraction (share of
    wall time the step loop waited for the loader, mean over ranks), and the datamodule's counters
    (data/skipped_<reason>, data/samples_read, data/skipped_fraction), summed over ranks.
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = max(1, every_n_steps)
        self._last: float | None = None
        self._window_start: float | None = None
        self._window_wait = 0.0
        self._window_samples = 0

    @staticmethod
    def _wait_seconds(trainer) -> float:
        batches = getattr(trainer.datamodule, "train_batches", None)
        return batches.wait_seconds if batches is not None else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            self._last = self._window_start = time.perf_counter()
            self._window_wait = self._wait_seconds(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        batch_size = len(batch["keys"])
        self._window_samples += batch_size
        if trainer.global_step % self.every_n_steps:
            return
        window = now - self._window_start
        if window > 0:
            rate = self._window_samples * trainer.world_size / window
            pl_module.log("train/samples_per_sec", rate, batch_size=batch_size)
        self._window_samples = 0
        if trainer.datamodule is None:
            self._window_start = now
            return
        wait = self._wait_seconds(trainer)
        metrics = {"data/wait_fraction": (wait - self._window_wait) / window if window > 0 else 0.0}
        self._window_start, self._window_wait = now, wait
        pl_module.log_dict(metrics, sync_dist=True, batch_size=batch_size)
        datamodule = trainer.datamodule
        if hasattr(datamodule, "metrics"):
            pl_module.log_dict(datamodule.metrics(), sync_dist=True, reduce_fx="sum", batch_size=batch_size)
            pl_module.log_dict({"data/skipped_fraction": datamodule.skipped_fraction(),
                                "data/epoch": float(datamodule.epoch)}, sync_dist=True, batch_size=batch_size)


class StepProgressBar(TQDMProgressBar):
    """One bar over all optimizer steps (the stream has no epochs), so tqdm can show an ETA."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer, *_) -> None:
        if trainer.current_epoch == 0 or self.train_progress_bar.total != trainer.max_steps:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == trainer.max_steps:
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        metrics["step"] = trainer.global_step
        # Read here, at a refresh (a logging step), not logged with prog_bar=True: Lightning turns
        # progress-bar metrics into Python numbers after every step, which waits for the device.
        for name in ("train/loss", "train/samples_per_sec"):
            value = trainer.callback_metrics.get(name)
            if value is not None:
                metrics[name.split("/", 1)[1]] = f"{float(value):.4g}"
        return metrics


def without_encoders_sampler(sampler: SamplerConfig, removed: tuple[str, ...]) -> SamplerConfig:
    """`sampler` that also removes the encoders `removed` (eval.without_encoders)."""
    return dataclasses.replace(sampler, drop_encoders=sorted({*sampler.drop_encoders, *removed}))


def renamed_without(metrics: dict[str, float], removed: tuple[str, ...]) -> dict[str, float]:
    """eval/<name> -> eval/without_<encoders>/<name>."""
    prefix = f"eval/without_{'_'.join(sorted(set(removed)))}/"
    return {prefix + name.removeprefix("eval/"): value for name, value in metrics.items()}


# The adherence evaluation's seeds start this far after the previews' (which start at eval.seed).
EVAL_SEED_OFFSET = 100_000


class PreviewAndEvaluate(L.Callback):
    """Writes sample grids to run_dir/samples/step-N/ (and W&B) and, at the end, measures colour and
    shape adherence over every caption of the shapes grammar, and of each new shape a finetune taught
    (`new_shapes`; sd3train/eval/shapes_suite.py), its samples in samples/eval-step-N.png.

    Samples come from the EMA weights when EMA is on. Seeds start at `seed`, far from anything the
    training streams use, so the evaluation never sees training noise; the evaluation's start at
    `seed + EVAL_SEED_OFFSET`, so they are not the preview grid's either.
    """

    def __init__(self, run_dir: Path, prompts: list[str], seed: int, every_n_steps: int, samples_per_caption: int,
                 new_shapes: tuple[str, ...] = (), without_encoders: tuple[str, ...] = ()):
        self.run_dir = run_dir
        self.prompts = prompts
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.samples_per_caption = samples_per_caption
        self.new_shapes = tuple(new_shapes)
        self.without_encoders = tuple(without_encoders)

    def _latent_shape(self, pl_module) -> tuple[int, int, int]:
        side = pl_module.cfg.data.resolution // pl_module.vae.downsample_factor
        return (pl_module.cfg.vae.latent_channels, side, side)

    def _generate(self, pl_module, prompts: list[str], first_seed: int, sampler=None):
        seeds = [first_seed + index for index in range(len(prompts))]
        latents = generate_latents(
            pl_module.sampling_model, pl_module.sampling_text, prompts, seeds, self._latent_shape(pl_module),
            sampler or pl_module.cfg.diffusion.sampler,
        )
        return decode_to_uint8(pl_module.vae, latents), seeds

    @staticmethod
    def _generates(trainer) -> bool:
        """Whether this rank runs the sampler: rank 0, or every rank under ZeRO-3 and FSDP2, whose
        weights are gathered from all ranks as each layer runs (rank 0 alone would wait forever)."""
        return (trainer.is_global_zero or bool(getattr(trainer.strategy, "zero_stage_3", False))
                or hasattr(trainer.strategy, "fsdp_mesh"))

    def _preview(self, trainer, pl_module, logger_step: int) -> None:
        """Sample the preview prompts into samples/step-N/ and to W&B at `logger_step` (the step
        Lightning gives the loggers for what is logged now: W&B drops anything logged at an earlier
        step than one it has seen)."""
        if not self.prompts or not self._generates(trainer):
            return
        step = trainer.global_step
        images, seeds = self._generate(pl_module, self.prompts, self.seed)
        if not trainer.is_global_zero:
            return
        write_samples(self.run_dir / "samples" / f"step-{step}", images, self.prompts, seeds)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=list(images), caption=self.prompts, step=logger_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < trainer.max_steps:
            # Lightning logs the k-th step's metrics, and a validation run after it, at step k - 1.
            self._preview(trainer, pl_module, logger_step=step - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step < trainer.max_steps:  # stopped early (preemption): not the end yet
            return
        self._preview(trainer, pl_module, logger_step=trainer.global_step)  # after the last step's metrics
        if not self.samples_per_caption or not self._generates(trainer):
            return
        prompts = evaluation_prompts(self.samples_per_caption, self.new_shapes)
        first_seed = self.seed + EVAL_SEED_OFFSET
        images, _ = self._generate(pl_module, prompts, first_seed)
        fewer = None
        if self.without_encoders:  # the same seeds again, the encoders removed (every sampling rank, in step)
            sampler = without_encoders_sampler(pl_module.cfg.diffusion.sampler, self.without_encoders)
            fewer, _ = self._generate(pl_module, prompts, first_seed, sampler)
        if not trainer.is_global_zero:
            return
        metrics = adherence_metrics(images, prompts, self.new_shapes)
        if fewer is not None:
            metrics.update(renamed_without(adherence_metrics(fewer, prompts, self.new_shapes), self.without_encoders))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        concept = len(prompts) - len(evaluation_prompts(self.samples_per_caption))  # the new shapes' samples
        for name, score in metrics.items():
            count = concept // len(self.new_shapes) if name.startswith("eval/concept/") else len(prompts) - concept
            print(f"{name} = {score:.3f} over {count} samples (seeds from {first_seed})")
        # What was scored, to look at: each caption's samples side by side, about 12 to a row.
        columns = self.samples_per_caption * max(1, 12 // self.samples_per_caption)
        grid = write_grid(self.run_dir / "samples" / f"eval-step-{trainer.global_step}.png", images, columns)
        print(f"evaluation samples: {grid}")
