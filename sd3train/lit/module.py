"""LightningModule: frozen VAE and text encoders, trainable MM-DiT, rectified-flow objective."""

from __future__ import annotations

import lightning as L
import torch

from sd3train.checkpoint.components import (
    mmdit_from_config,
    text_conditioner_from_config,
    vae_from_config,
    weight_sources,
)
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import to_plain
from sd3train.data.cache_format import TEXT_OUTPUTS
from sd3train.diffusion.flow import binned_mean, interpolate, per_sample_mse, velocity_target
from sd3train.diffusion.timesteps import resolution_shift, sample_timesteps
from sd3train.lit.ema import EMAModel
from sd3train.lit.latent_cache import LatentMomentCache
from sd3train.lit.loggers import wandb_run_id
from sd3train.lit.nonfinite import NonFiniteGuard, SkippableAdamW
from sd3train.model.embeddings import random_crop_offsets
from sd3train.model.mmdit import MMDiT
from sd3train.model.text_encoders import ENCODER_NAMES, TextConditioner
from sd3train.paths import run_dir_of
from sd3train.runtime.lr_schedule import lr_factor
from sd3train.runtime.rng import derive_seed, step_generator

# Validation loss as in SD3: 8 equally spaced t in [0, 1), excluding the pure-noise end t = 1.
VALIDATION_TIMESTEPS = tuple(k / 8 for k in range(8))


class SD3LitModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.mmdit = mmdit_from_config(cfg.model)
        self.vae = vae_from_config(cfg.vae)  # frozen, eval mode
        self.text = text_conditioner_from_config(cfg.text)
        self.ema = EMAModel(self.mmdit, cfg.ema.decay) if cfg.ema.enabled else None
        self.guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        self.latent_cache = LatentMomentCache(cfg.data.latent_cache_max_samples) if cfg.data.cache_latents else None
        diffusion = cfg.diffusion
        self.train_shift = (
            resolution_shift(cfg.data.resolution, cfg.data.resolution, diffusion.base_resolution)
            if diffusion.resolution_dependent_shift
            else diffusion.shift
        )
        # Loss per timestep bin since the last log; summed over ranks when logged.
        self.register_buffer("bin_sums", torch.zeros(diffusion.num_loss_bins, dtype=torch.float64), persistent=False)
        self.register_buffer("bin_counts", torch.zeros(diffusion.num_loss_bins, dtype=torch.float64), persistent=False)

    def train(self, mode: bool = True) -> "SD3LitModule":
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode whatever Lightning asks
        self.text.eval()
        return self

    @property
    def sampling_model(self) -> MMDiT:
        """The weights used for previews and evaluation: the EMA copy when there is one."""
        return self.ema.shadow if self.ema is not None else self.mmdit

    # ------------------------------------------------------------------ training
    def _encode_batch(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Latents, context and pooled text for a batch; `generator` None means no randomness.

        A batch from the precompute cache ("latent_mean" in it) skips both encoders and draws the
        same random numbers in the same order as the online path, so both give the same loss.
        """
        with torch.no_grad():
            if "latent_mean" in batch:
                mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
            else:
                mean, logvar = self._moments(batch)
                std = torch.exp(0.5 * logvar)
            if generator is None:
                latents = self.vae.normalise(mean)
            else:
                eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
                latents = self.vae.normalise(mean + std * eps)
            if "latent_mean" in batch:
                outputs = {name: batch[name].to(self.device, torch.float32) for name in TEXT_OUTPUTS}
                keep = None if generator is None else self.text.dropout_keep_mask(len(batch["keys"]), generator)
                context, pooled = TextConditioner.assemble(outputs, keep)
            else:
                context, pooled = self.text(batch["captions"], generator=generator)
        return latents.float(), context.to(self.device), pooled.to(self.device)

    def _moments(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, logvar) of the batch images, from the latent cache when it is on."""
        images = batch["images"]
        if self.latent_cache is None:
            return self.vae.encode_moments(images.to(self.device))
        ids = [f"{url}#{key}" for url, key in zip(batch["urls"], batch["keys"])]
        return self.latent_cache.moments(
            ids, lambda rows: self.vae.encode_moments(images[rows].to(self.device)), self.device
        )

    def _flow_loss(self, latents, context, pooled, t, noise, pos_offset=None) -> torch.Tensor:
        """Per-sample rectified-flow MSE between predicted and target velocity."""
        noisy = interpolate(latents, noise, t)
        prediction = self.mmdit(noisy, t, context, pooled, pos_offset=pos_offset)
        return per_sample_mse(prediction.float(), velocity_target(latents, noise))

    def _step_stream(self, batch_idx: int) -> str:
        # Micro-batches of one accumulated step need streams of their own.
        accumulate = self.cfg.trainer.accumulate_grad_batches
        stream = "train" if accumulate == 1 else f"train-{batch_idx % accumulate}"
        return stream

    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        """True only when `value` is finite on every rank, so all ranks skip the same steps."""
        bad = torch.tensor(0.0 if bool(torch.isfinite(value).all()) else 1.0, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return float(bad) == 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = step_generator(self.cfg.trainer.seed, self.global_step, self.global_rank, self._step_stream(batch_idx))
        latents, context, pooled = self._encode_batch(batch, generator)
        diffusion = self.cfg.diffusion
        t = sample_timesteps(
            latents.shape[0], diffusion.density, generator,
            logit_mean=diffusion.logit_mean, logit_std=diffusion.logit_std,
            mode_scale=diffusion.mode_scale, shift=self.train_shift,
        ).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        pos_offset = None
        if self.cfg.model.pos_embed_random_crop:  # drawn last: the step's other draws stay as without it
            patch = self.mmdit.patch_size
            pos_offset = random_crop_offsets(
                latents.shape[0], latents.shape[-2] // patch, latents.shape[-1] // patch,
                self.mmdit.pos_embed_max_size, generator, region=self.cfg.model.pos_embed_crop_region,
            )
        losses = self._flow_loss(latents, context, pooled, t, noise, pos_offset)
        loss = losses.mean()
        finite = self._all_ranks_finite(loss.detach())
        self.guard.observe_loss(finite)
        if finite:
            sums, counts = binned_mean(losses.detach().double(), t, diffusion.num_loss_bins)
            self.bin_sums += sums.to(self.bin_sums)
            self.bin_counts += counts.to(self.bin_counts)
        batch_size = latents.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.mmdit.parameters() if p.grad is not None]
        grad_finite = True
        if grads:  # the norm before clipping, which is what shows an instability coming
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm)
            grad_finite = self._all_ranks_finite(norm.detach())
        skip = self.guard.decide(grad_finite)
        for inner in _inner_optimizers(optimizer):
            inner.skip_update = skip
        self.log("train/nonfinite_steps", float(self.guard.total))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None) if self._trainer is not None else None
        if engine is not None:  # under ZeRO the gradients live in DeepSpeed's partitions, not in p.grad
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm))
        # The EMA follows the update here, not in on_train_batch_end: callbacks (the checkpoint
        # among them) see a step's end before the module does, and must see its EMA too.
        # global_step counts this step only after the hook returns.
        if self.ema is not None and self.global_step + 1 >= self.cfg.ema.start_step and not self.guard.last_skipped:
            self.ema.update(self.mmdit)

    @property
    def last_step_nonfinite(self) -> bool:
        """The most recent optimizer step was skipped (read by the checkpoint callback)."""
        return self.guard.last_skipped

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        at_step_end = (batch_idx + 1) % self.cfg.trainer.accumulate_grad_batches == 0
        if at_step_end:
            self.guard.check(self.global_step)

        if self.global_step % self.cfg.trainer.log_every_n_steps == 0:
            sums = self.trainer.strategy.reduce(self.bin_sums.clone(), reduce_op="sum")
            counts = self.trainer.strategy.reduce(self.bin_counts.clone(), reduce_op="sum")
            for index in range(len(sums)):
                if counts[index] > 0:
                    self.log(f"train/loss_bin_{index}", (sums[index] / counts[index]).float())
            self.bin_sums.zero_()
            self.bin_counts.zero_()

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        latents, context, pooled = self._encode_batch(batch, generator=None)
        # The same noise at every evaluation, so validation curves compare like with like.
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.trainer.seed, "validation", batch_idx))
        batch_size = latents.shape[0]
        total = 0.0
        for t_value in VALIDATION_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator).to(self.device)
            t = torch.full((batch_size,), t_value, device=self.device)
            loss = self._flow_loss(latents, context, pooled, t, noise).mean()
            self.log(f"val/loss_t{t_value:.3f}", loss, sync_dist=True, batch_size=batch_size)
            total = total + loss
        self.log("val/loss", total / len(VALIDATION_TIMESTEPS), sync_dist=True, batch_size=batch_size)

    # ----------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        optim = self.cfg.optim
        optimizer = SkippableAdamW(
            self.mmdit.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        total = self.cfg.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, optim.warmup_steps, total, optim.schedule, optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --------------------------------------------------------------- checkpoints
    def _frozen_from_files(self) -> tuple[str, ...]:
        """Prefixes of frozen parts that are loaded from weight files, so checkpoints need no copy.

        Randomly initialised encoders (tiny configs) are saved: a checkpoint must not depend on
        the initialisation code staying bit-for-bit the same.
        """
        text_from_files = len(weight_sources(self.cfg.text)) == len(ENCODER_NAMES)  # else all are saved
        return tuple(prefix for prefix, from_files in (("vae.", self.cfg.vae.weights is not None),
                                                       ("text.", text_from_files)) if from_files)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        skipped = self._frozen_from_files()
        for key in [key for key in state if skipped and key.startswith(skipped)]:
            del state[key]
        checkpoint["sd3train_config"] = to_plain(self.cfg)
        checkpoint["sd3train_guard"] = self.guard.state_dict()
        # The W&B id is a function of the run directory (sd3train.lit.loggers); recorded for tools.
        checkpoint["sd3train_wandb_run_id"] = wandb_run_id(run_dir_of(self.cfg))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sd3train_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["sd3train_guard"])
        if "state_dict" not in checkpoint:
            return  # DeepSpeed restores the (sharded) weights itself and hands over the rest
        # Parts left out at save time come from the weight files they were loaded from.
        state = checkpoint["state_dict"]
        for prefix, module in (("vae.", self.vae), ("text.", self.text)):
            for key, value in module.state_dict().items():
                state.setdefault(prefix + key, value)


def _inner_optimizers(optimizer) -> list:
    """The SkippableAdamW behind Lightning's wrapper (and DeepSpeed's ZeRO optimizer, if any)."""
    found, seen, todo = [], set(), [optimizer]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SkippableAdamW):
            found.append(current)
        todo.extend(getattr(current, name, None) for name in ("_optimizer", "optimizer"))
    return found
