"""LightningModule: frozen VAE and text encoders, trainable MM-DiT, rectified-flow objective.

An ordinary training step never waits for the host: its random numbers are drawn on the training
device, token ids travel with the batch, whether the step was finite stays a device tensor that
fused AdamW and the EMA read themselves (sd3train/lit/nonfinite.py), and metrics are reduced and
handed to the loggers only at logging steps. Logging and checkpoint steps read what they need.
`tests/unit/lit/test_host_syncs.py` counts the reads of an ordinary step: zero.
"""

from __future__ import annotations

import lightning as L
import torch

from sd3train.checkpoint.components import adapted_mmdit_from_config, mmdit_from_config, vae_from_config
from sd3train.config.schema import TrainConfig
from sd3train.config.typed import to_plain
from sd3train.data.cache_format import TEXT_OUTPUTS
from sd3train.data.folder import folder_prefix
from sd3train.diffusion.flow import (
    binned_mean,
    interpolate,
    masked_per_sample_mse,
    per_sample_mse,
    prior_preservation_loss,
    velocity_target,
)
from sd3train.diffusion.timesteps import resolution_shift, sample_timesteps
from sd3train.lit.ema import EMAModel
from sd3train.lit.latent_cache import LatentMomentCache
from sd3train.lit.loggers import wandb_run_id
from sd3train.lit.nonfinite import NonFiniteGuard, SkippableAdamW
from sd3train.lit.saved_state import fill_left_out, prune_saved_state
from sd3train.lit.text_adapters import (
    SamplingText,
    adapted_modules,
    adapted_outputs,
    adapter_parameters,
    build_text,
)
from sd3train.model.adapters import set_adapter_training
from sd3train.model.compile import compile_blocks, compile_enabled
from sd3train.model.embeddings import random_crop_offsets
from sd3train.model.float8 import convert_blocks_to_float8
from sd3train.model.mmdit import MMDiT
from sd3train.model.sharding import is_sharded, shard_mmdit, shard_module
from sd3train.model.text_encoders import ENCODER_NAMES, TextConditioner
from sd3train.paths import resolve_repo_path, run_dir_of
from sd3train.runtime.lr_schedule import lr_factor
from sd3train.runtime.rng import derive_seed, step_generator

# Validation loss as in SD3: 8 equally spaced t in [0, 1), excluding the pure-noise end t = 1.
VALIDATION_TIMESTEPS = tuple(k / 8 for k in range(8))


class SD3LitModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.base_digest = None  # adapters: the digest of the base weights they train on
        if cfg.adapter.kind == "none":
            self.mmdit = mmdit_from_config(cfg.model)
        else:
            self.mmdit, self.base_digest = adapted_mmdit_from_config(cfg.model, cfg.adapter, resolve_frozen_dtype(cfg))
        # The EMA copy is taken before float8 and compilation: it averages in plain modules.
        self.ema = EMAModel(self.mmdit, cfg.ema.decay, cfg.ema.every_n_steps) if cfg.ema.enabled else None
        # torchtitan's order: activation checkpointing (set when built), float8, compile, then
        # sharding (configure_model). Both change modules in place and keep the parameter names.
        convert_blocks_to_float8(self.mmdit, cfg.model.float8)
        if compile_enabled(cfg.model.compile, cfg.trainer.accelerator, cfg.strategy.name):
            compile_blocks(self.mmdit)
        frozen_dtype = resolve_frozen_dtype(cfg)
        self.vae = vae_from_config(cfg.vae, dtype=frozen_dtype)  # frozen, eval mode
        # On the cache the training device gets neither the VAE encoder nor the text encoders (CPU,
        # built when a preview first needs them), but for adapted CLIP ones (sd3train/lit/text_adapters.py).
        self.text, self.text_digests = build_text(cfg, frozen_dtype)
        if cfg.data.cached:
            self.vae.encoder = self.vae.quant_conv = None
        self.text_adapted = tuple(cfg.adapter.text_encoders)  # they train, with their own EMA copy
        self.text_ema = (EMAModel(adapted_modules(self.text, self.text_adapted), cfg.ema.decay, cfg.ema.every_n_steps)
                         if self.text_adapted and cfg.ema.enabled else None)
        self.guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        # Prior preservation: the class images' samples are told by their url (sd3train/data/folder.py).
        self.class_prefix = (folder_prefix(resolve_repo_path(cfg.data.class_images))
                             if cfg.data.class_images is not None else None)
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

    def configure_model(self) -> None:
        """Under strategy=fsdp, shard the MM-DiT and its EMA copy alike (the same mesh and units, so
        the EMA averages each rank's shard with no communication). Lightning calls this once the
        processes are up; other strategies keep the modules whole."""
        strategy = self.cfg.strategy
        if strategy.name != "fsdp" or is_sharded(self.mmdit):
            return
        param_dtype = half_precision_dtype(self.cfg.trainer.precision)
        for model in [self.mmdit] + ([self.ema.shadow] if self.ema is not None else []):
            shard_mmdit(model, self.trainer.strategy.fsdp_mesh, param_dtype=param_dtype,
                        reshard_after_forward=strategy.reshard_after_forward, cpu_offload=strategy.cpu_offload)
        # Adapted text encoders (and their EMA copies): one unit each, so their adapters' gradients are reduced.
        for model in [adapted_modules(self.text, self.text_adapted)] + ([self.text_ema.shadow] if self.text_ema else []):
            for encoder in model.values():
                shard_module(encoder, self.trainer.strategy.fsdp_mesh, param_dtype=param_dtype,
                             cpu_offload=strategy.cpu_offload)

    def train(self, mode: bool = True) -> "SD3LitModule":
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode whatever Lightning asks
        self.text.eval()
        for name in self.text_adapted:  # but for the adapters on text encoders (their dropout)
            set_adapter_training(getattr(self.text, name), mode)
        return self

    @property
    def sampling_model(self) -> MMDiT:
        """The weights used for previews and evaluation: the EMA copy when there is one."""
        return self.ema.shadow if self.ema is not None else self.mmdit

    @property
    def sampling_text(self):
        """What prompts are encoded with for previews and evaluation: `text`, its adapted encoders the
        EMA copies when there are some."""
        return SamplingText(self.text, self.text_ema.shadow) if self.text_ema is not None else self.text

    # ------------------------------------------------------------------ training
    def prepare_batch(self, batch: dict) -> dict:
        """What the data module applies to a batch on the host before it moves to the device: the
        captions' token ids, so they travel with the batch instead of being copied in the step."""
        live = "latent_mean" not in batch or self.text_adapted  # on the cache, the adapted encoders' only
        if "captions" in batch and live and hasattr(self.text, "tokenize"):
            batch["token_ids"] = self.text.tokenize(batch["captions"])
        return batch

    def _encode_batch(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Latents, context and pooled text for a batch; `generator` None means no randomness.

        A batch from the precompute cache ("latent_mean" in it) skips both encoders and draws the
        same random numbers in the same order as the online path, so both give the same loss.
        Adapted text encoders run outside no_grad, on the cache too.
        """
        with torch.no_grad():
            if "latent_mean" in batch:
                mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
            else:
                mean, logvar = self._moments(batch)
                mean, std = mean.float(), torch.exp(0.5 * logvar.float())
            if generator is None:
                latents = self.vae.normalise(mean)
            else:
                eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
                latents = self.vae.normalise(mean + std * eps)
            keep = None if generator is None else self.text.dropout_keep_mask(mean.shape[0], generator)
            live = "latent_mean" not in batch or self.text_adapted
            token_ids = (batch.get("token_ids") or self.text.tokenize(batch["captions"])) if live else None
            if "latent_mean" in batch:
                # In the cache's dtype: masking, padding and concatenating are exact in any dtype,
                # and half the bytes; the context becomes fp32 once, below.
                outputs = {name: batch[name].to(self.device) for name in TEXT_OUTPUTS}
            else:
                frozen = tuple(name for name in ENCODER_NAMES if name not in self.text_adapted)
                outputs = self.text.encode_tokens(token_ids, frozen)
        if self.text_adapted:
            outputs.update(adapted_outputs(self.text, self.text_adapted, token_ids, self.device))
        context, pooled = TextConditioner.assemble(outputs, keep)
        return latents.float(), context.to(self.device, torch.float32), pooled.to(self.device, torch.float32)

    def _moments(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, logvar) of the batch images, from the latent cache when it is on."""
        images = batch["images"]
        if self.latent_cache is None:
            return self.vae.encode_moments(images.to(self.device))
        ids = [f"{url}#{key}" for url, key in zip(batch["urls"], batch["keys"])]
        return self.latent_cache.moments(
            ids, lambda rows: self.vae.encode_moments(images[rows].to(self.device)), self.device
        )

    def _flow_loss(self, latents, context, pooled, t, noise, pos_offset=None, mask=None) -> torch.Tensor:
        """Per-sample rectified-flow MSE between predicted and target velocity; `mask` (B, 1, h, w)
        on the latent grid weights it, normalised by the masked area."""
        noisy = interpolate(latents, noise, t)
        prediction = self.mmdit(noisy, t, context, pooled, pos_offset=pos_offset)
        if mask is not None:
            return masked_per_sample_mse(prediction.float(), velocity_target(latents, noise), mask)
        return per_sample_mse(prediction.float(), velocity_target(latents, noise))

    def _step_stream(self, batch_idx: int) -> str:
        # Micro-batches of one accumulated step need streams of their own.
        accumulate = self.cfg.trainer.accumulate_grad_batches
        return "train" if accumulate == 1 else f"train-{batch_idx % accumulate}"

    def _agreed(self, finite: torch.Tensor) -> torch.Tensor:
        """`finite` (a device bool) and-ed over every rank, so all ranks skip the same steps; a
        collective, but no value is read back to the host."""
        if self._trainer is None or self.trainer.world_size == 1:
            return finite
        bad = self.trainer.strategy.reduce((~finite).float(), reduce_op="sum")
        return bad == 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        device = self.device
        generator = step_generator(self.cfg.trainer.seed, self.global_step, self.global_rank,
                                   self._step_stream(batch_idx), device=device)
        latents, context, pooled = self._encode_batch(batch, generator)
        diffusion = self.cfg.diffusion
        t = sample_timesteps(
            latents.shape[0], diffusion.density, generator,
            logit_mean=diffusion.logit_mean, logit_std=diffusion.logit_std,
            mode_scale=diffusion.mode_scale, shift=self.train_shift,
        ).to(device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        pos_offset = None
        if self.cfg.model.pos_embed_random_crop:  # drawn last: the step's other draws stay as without it
            patch = self.mmdit.patch_size
            pos_offset = random_crop_offsets(
                latents.shape[0], latents.shape[-2] // patch, latents.shape[-1] // patch,
                self.mmdit.pos_embed_max_size, generator, region=self.cfg.model.pos_embed_crop_region,
            )
        mask = None
        if "masks" in batch:  # pixel masks (B, 1, H, W) -> the latent grid, by area
            mask = torch.nn.functional.interpolate(batch["masks"].to(device, torch.float32), size=latents.shape[-2:],
                                                   mode="area")
        losses = self._flow_loss(latents, context, pooled, t, noise, pos_offset, mask)
        loss = losses.mean()
        if self.class_prefix is not None:
            # Prior preservation: the class images' loss apart, weighted.
            prior = torch.tensor([url.startswith(self.class_prefix) for url in batch["urls"]],
                                 dtype=losses.dtype).to(device)
            loss, instance_loss, prior_loss = prior_preservation_loss(losses, prior, self.cfg.optim.prior_loss_weight)
            if self._logs_this_step():
                self.log("train/loss_prior", prior_loss, batch_size=latents.shape[0])
                self.log("train/loss_instance", instance_loss, batch_size=latents.shape[0])
        finite = torch.isfinite(loss.detach())
        self.guard.observe_loss(finite)
        sums, counts = binned_mean(losses.detach().double(), t, diffusion.num_loss_bins)
        # A non-finite step adds nothing to the bins (a NaN times zero is still NaN: select instead).
        self.bin_sums += torch.where(finite, sums, 0.0).to(self.bin_sums)
        self.bin_counts += torch.where(finite, counts, 0.0).to(self.bin_counts)
        if self._logs_this_step():
            self.log("train/loss", loss, batch_size=latents.shape[0])
        return loss

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step under way is a logging step (Lightning hands step metrics to
        the loggers at those only; a `self.log` call costs about a millisecond on the host)."""
        return (self.global_step + 1) % self.cfg.trainer.log_every_n_steps == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        trained = list(self.mmdit.parameters()) + adapter_parameters(self.text, self.text_adapted)
        grads = [p.grad for p in trained if p.grad is not None]
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        clip_scale = None
        if grads:  # the norm before clipping, which is what shows an instability coming
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
                norm = norm.full_tensor()
            if self._logs_this_step():
                self.log("train/grad_norm", norm)
            finite = torch.isfinite(norm)
            if self.cfg.optim.grad_clip is not None and not _under_deepspeed(self):
                # Clipped with the norm just computed, inside fused AdamW's kernel (which divides each
                # gradient by `grad_scale` as it reads it): no second norm (Lightning's clipping is off,
                # sd3train/lit/trainer.py) and no extra pass over the gradients. The factor is
                # torch.nn.utils.clip_grad_norm_'s; a skipped step's NaN factor is never applied.
                clip_scale = torch.clamp((norm + 1e-6) / self.cfg.optim.grad_clip, min=1.0)
        self.guard.decide(self._agreed(self.guard.take_window() & finite), step=self.global_step + 1)
        for inner in _inner_optimizers(optimizer):
            inner.found_inf = self.guard.found_inf
            inner.grad_scale = clip_scale

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None) if self._trainer is not None else None
        if engine is not None and self._logs_this_step():  # under ZeRO the gradients live in DeepSpeed's partitions
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm))
        # The EMA follows the update here, not in on_train_batch_end: callbacks (the checkpoint
        # among them) see a step's end before the module does, and must see its EMA too.
        # global_step counts this step only after the hook returns.
        step = self.global_step + 1
        if self.ema is not None and step >= self.cfg.ema.start_step and self.ema.due(step):
            self.ema.update(self.mmdit, applied=self.guard.ok)
            if self.text_ema is not None:
                self.text_ema.update(adapted_modules(self.text, self.text_adapted), applied=self.guard.ok)

    @property
    def last_step_nonfinite(self) -> bool:
        """The most recent optimizer step was skipped (read by the checkpoint callback)."""
        return self.guard.last_skipped

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.cfg.trainer.accumulate_grad_batches:
            return  # mid accumulation: nothing was decided yet
        step, trainer_cfg = self.global_step, self.cfg.trainer
        logging = step % trainer_cfg.log_every_n_steps == 0
        if logging or step % trainer_cfg.checkpoint_every_n_steps == 0 or step >= trainer_cfg.max_steps:
            self.guard.check()  # K non-finite steps in a row stop the run here, at the step they ended
        if not logging:
            return
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/nonfinite_steps", self.guard.total.float())
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
        generator = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.trainer.seed, "validation", batch_idx))
        batch_size = latents.shape[0]
        total = 0.0
        for t_value in VALIDATION_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator, device=self.device)
            t = torch.full((batch_size,), t_value, device=self.device)
            loss = self._flow_loss(latents, context, pooled, t, noise).mean()
            self.log(f"val/loss_t{t_value:.3f}", loss, sync_dist=True, batch_size=batch_size)
            total = total + loss
        self.log("val/loss", total / len(VALIDATION_TIMESTEPS), sync_dist=True, batch_size=batch_size)

    # ----------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        optim = self.cfg.optim
        trained = [parameter for parameter in self.mmdit.parameters() if parameter.requires_grad]  # adapters: theirs
        trained += adapter_parameters(self.text, self.text_adapted)  # the text encoders' adapters, if any
        optimizer = SkippableAdamW(trained, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                   weight_decay=optim.weight_decay)
        total = self.cfg.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, optim.warmup_steps, total, optim.schedule, optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prune_saved_state(self, checkpoint)  # frozen parts from weight files; adapter bases (lit/saved_state.py)
        checkpoint["sd3train_config"] = to_plain(self.cfg)
        checkpoint["sd3train_guard"] = self.guard.state_dict()
        # The W&B id is a function of the run directory (sd3train.lit.loggers); recorded for tools.
        checkpoint["sd3train_wandb_run_id"] = wandb_run_id(run_dir_of(self.cfg))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sd3train_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["sd3train_guard"])
        if "state_dict" not in checkpoint:
            return  # DeepSpeed restores the (sharded) weights itself and hands over the rest
        fill_left_out(self, checkpoint)  # parts left out at save time, from the files they were loaded from


def resolve_frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """`trainer.frozen_dtype` as a torch dtype; "auto" follows the training precision (fp32 under
    DeepSpeed, whose ZeRO-3 partitions the frozen parts with the trained ones)."""
    name = cfg.trainer.frozen_dtype
    if name == "auto":
        if cfg.strategy.name == "deepspeed":
            return torch.float32
        return half_precision_dtype(cfg.trainer.precision) or torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def half_precision_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit dtype a Lightning precision computes in (bf16-mixed, bf16-true, 16-mixed, ...), or None."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def _under_deepspeed(module: L.LightningModule) -> bool:
    return module._trainer is not None and hasattr(module.trainer.strategy, "deepspeed_engine")


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
