"""Cross-field validation of a composed config, before any model is built."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from sd3train.config.adapter_schema import ADAPTER_KINDS, LORA_INITS
from sd3train.config.schema import FLOAT8_RECIPES, TEXT_ENCODER_NAMES, SamplerConfig, TrainConfig
from sd3train.config.typed import ConfigError, build_typed
from sd3train.config.validate_adapter import text_adapter_problems
from sd3train.config.validate_data import data_problems
from sd3train.config.validate_eval import eval_problems
from sd3train.config.validate_training import strategy_problems, trainer_problems
from sd3train.data.cache_info import training_cache_problems
from sd3train.data.shapes import all_specs
from sd3train.paths import resolve_repo_path
from sd3train.runtime.lr_schedule import SCHEDULES

DENSITIES = ("logit_normal", "mode", "cosmap", "uniform")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
WANDB_MODES = ("online", "offline", "disabled")
UNCOND_MODES = ("zeros", "empty_prompt")
# sd3train.model.activation_checkpointing.ACTIVATION_CHECKPOINTING and sd3train.model.attention.ATTENTION_BACKENDS
# (tests/unit/model/test_model_options.py checks they agree; config sits below model and cannot import them).
ACTIVATION_CHECKPOINTING_MODES = ("none", "full", "selective", "every_k")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# Kernels torch has only for CUDA devices.
CUDA_ONLY_ATTENTION_BACKENDS = ("cudnn", "efficient")


class RequiredValueError(ValueError):
    """Raised by the `required` resolver; the message is the finished problem line."""


def _required(reason: str, *, _node_) -> None:
    # `key: ${required:'why'}` in an experiment makes `key` a value the user must set. '???' cannot
    # do it there: OmegaConf's merge keeps conf/config.yaml's null over a later '???'.
    raise RequiredValueError(f"{_node_._get_full_key(None)}: required value is missing ({reason})")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_new_resolver("required", _required)
# `key: ${shapes_grammar:}`: every caption of the embedded default's grammar (sd3train/data/shapes.py).
if not OmegaConf.has_resolver("shapes_grammar"):
    OmegaConf.register_new_resolver("shapes_grammar", lambda: [spec.caption for spec in all_specs()])


def _resolution_message(error: BaseException, outer: BaseException | None) -> str:
    cause: BaseException | None = error
    # OmegaConf re-raises resolver errors, so the original is a few links back; links past `outer`
    # (what the caller was handling when it asked) belong to another failure.
    while cause is not None and cause is not outer:
        if isinstance(cause, RequiredValueError):
            return str(cause)
        cause = cause.__context__
    return str(error).splitlines()[0]


def unresolvable_problems(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """One line per distinct failure among the interpolations under `node` (Hydra's own node skipped),
    so a required value that several keys interpolate is reported once, beside any other failure."""
    problems: list[str] = []
    outer = sys.exc_info()[1]
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if f"{prefix}{key}" == "hydra" or OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except Exception as error:
            problems.append(_resolution_message(error, outer))
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            problems.extend(unresolvable_problems(value, f"{prefix}{key}."))
    return list(dict.fromkeys(problems))


def _in_range(problems: list[str], key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        problems.append(f"{key}: {value} is outside [{low}, {high}]")


def skip_layer_problems(sampler: SamplerConfig, depth: int, prefix: str = "") -> list[str]:
    """Skip-layer guidance settings that cannot work with an MM-DiT of `depth` joint blocks."""
    problems = []
    outside = [layer for layer in sampler.skip_layers if not 0 <= layer < depth]
    if outside:
        problems.append(f"{prefix}skip_layers: {outside} outside the model's joint blocks 0..{depth - 1}")
    if sampler.skip_layer_scale < 0:
        problems.append(f"{prefix}skip_layer_scale: must be >= 0, got {sampler.skip_layer_scale}")
    if sampler.skip_layer_scale > 0 and not sampler.skip_layers:
        problems.append(f"{prefix}skip_layer_scale: {sampler.skip_layer_scale} needs {prefix}skip_layers to name layers")
    unknown = [name for name in sampler.drop_encoders if name not in TEXT_ENCODER_NAMES]
    if unknown:
        problems.append(f"{prefix}drop_encoders: unknown encoder(s) {unknown}; expected some of {list(TEXT_ENCODER_NAMES)}")
    if not 0.0 <= sampler.skip_layer_start < sampler.skip_layer_stop <= 1.0:
        problems.append(f"{prefix}skip_layer_start/stop: need 0 <= start < stop <= 1, got "
                        f"{sampler.skip_layer_start}, {sampler.skip_layer_stop}")
    return problems


ARCHITECTURES = ("mmdit", "crossattn_dit")


def model_option_problems(cfg: TrainConfig) -> list[str]:
    """The MM-DiT's training options: activation checkpointing, compilation, attention kernel."""
    model, problems = cfg.model, []
    if model.activation_checkpointing not in ACTIVATION_CHECKPOINTING_MODES:
        problems.append(f"model.activation_checkpointing: {model.activation_checkpointing!r} is not one of "
                        f"{', '.join(ACTIVATION_CHECKPOINTING_MODES)}")
    if model.activation_checkpointing_every < 1:
        problems.append(f"model.activation_checkpointing_every: must be >= 1, "
                        f"got {model.activation_checkpointing_every}")
    if model.attention_backend not in ATTENTION_BACKENDS:
        problems.append(f"model.attention_backend: {model.attention_backend!r} is not one of "
                        f"{', '.join(ATTENTION_BACKENDS)}")
    elif model.attention_backend in CUDA_ONLY_ATTENTION_BACKENDS and cfg.trainer.accelerator == "cpu":
        problems.append(f"model.attention_backend: {model.attention_backend} attention needs a CUDA device, "
                        "trainer.accelerator is cpu (flash and math run on CPU)")
    if model.architecture not in ARCHITECTURES:
        problems.append(f"model.architecture: {model.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    elif model.architecture != "mmdit":
        # The study's baseline goes through the plain training path only.
        unsupported = {"model.weights": model.weights is not None, "model.compile": bool(model.compile),
                       "model.float8": model.float8 != "none", "model.dual_attention_layers": bool(model.dual_attention_layers),
                       "model.activation_checkpointing": model.activation_checkpointing != "none",
                       "model.pos_embed_random_crop": model.pos_embed_random_crop,
                       "adapter": cfg.adapter.kind != "none", "strategy.name": cfg.strategy.name != "ddp",
                       "diffusion.sampler.skip_layers": bool(cfg.diffusion.sampler.skip_layers)}
        problems += [f"{key}: not available with model.architecture={model.architecture} (its baseline trains "
                     "from scratch, uncompiled, under ddp, without adapters or skip-layer guidance)"
                     for key, bad in unsupported.items() if bad]
    if model.float8 not in FLOAT8_RECIPES:
        problems.append(f"model.float8: {model.float8!r} is not one of {', '.join(FLOAT8_RECIPES)}")
    elif model.float8 != "none" and cfg.strategy.name == "deepspeed":
        problems.append("model.float8: float8 training needs strategy ddp or fsdp; DeepSpeed ZeRO does not "
                        "run torchao's Float8Linear")
    if model.compile and cfg.strategy.name == "deepspeed":
        # ZeRO partitions parameters and hooks their gathering around each module: compiled blocks do
        # not follow it. Left at null, model.compile resolves to false with DeepSpeed.
        problems.append("model.compile: true does not work with strategy.name=deepspeed (ZeRO); "
                        "use strategy=ddp or model.compile=null")
    return problems


def adapter_problems(cfg: TrainConfig) -> list[str]:
    adapter = cfg.adapter
    if adapter.kind not in ADAPTER_KINDS:
        return [f"adapter.kind: {adapter.kind!r} is not one of {', '.join(ADAPTER_KINDS)}"]
    if adapter.kind == "none":
        if cfg.model.adapter_weights is not None:
            return ["model.adapter_weights: loads a LoRA into an adapter; set adapter=lora"]
        return []
    problems = []
    if cfg.model.weights is None:
        problems.append("adapter: adapters finetune a base model; set model.weights (a checkpoint, single file "
                        "or diffusers folder)")
    if adapter.rank < 1:
        problems.append(f"adapter.rank: must be >= 1, got {adapter.rank}")
    if adapter.alpha <= 0:
        problems.append(f"adapter.alpha: must be > 0, got {adapter.alpha}")
    if not 0.0 <= adapter.dropout < 1.0:
        problems.append(f"adapter.dropout: must be in [0, 1), got {adapter.dropout}")
    if not adapter.targets:
        problems.append("adapter.targets: name at least one group (attention, mlp, modulation, context_stream) "
                        "or module pattern")
    inits = LORA_INITS if adapter.kind in ("lora", "dora") else ("default",)
    if adapter.init not in inits:
        problems.append(f"adapter.init: {adapter.init!r} is not one of {', '.join(inits)} for {adapter.kind}")
    for index in adapter.blocks or []:
        if not 0 <= index < cfg.model.depth:
            problems.append(f"adapter.blocks: {index} is not a joint block of a depth-{cfg.model.depth} model")
    if cfg.strategy.name not in ("ddp", "fsdp"):
        problems.append(f"adapter: runs under strategy ddp or fsdp (strategy.name is {cfg.strategy.name})")
    if cfg.model.float8 != "none":
        problems.append("adapter: float8 matmuls apply to full finetuning; set model.float8=none")
    if cfg.model.adapter_weights is not None and adapter.kind != "lora":
        problems.append(f"model.adapter_weights: a LoRA file loads into adapter=lora, not {adapter.kind}")
    return problems


def upgrade_retired_values(plain: dict) -> dict:
    """Values of older configs and checkpoints in today's form: `model.activation_checkpointing`
    true/false (before its modes existed) is full/none. Runs before type checking, so the command
    line's `model.activation_checkpointing=true` and stored configs keep working."""
    model = plain.get("model")
    if isinstance(model, dict) and isinstance(model.get("activation_checkpointing"), bool):
        mode = "full" if model["activation_checkpointing"] else "none"
        plain = {**plain, "model": {**model, "activation_checkpointing": mode}}
    return plain


def cross_field_problems(cfg: TrainConfig) -> list[str]:
    """Every impossible combination in an otherwise well-typed config."""
    problems: list[str] = []
    model, text, vae, data = cfg.model, cfg.text, cfg.vae, cfg.data
    hidden = model.hidden_size or 64 * model.depth
    heads = model.num_heads or model.depth
    if model.depth < 1:
        problems.append(f"model.depth: must be >= 1, got {model.depth}")
    elif hidden % heads:
        problems.append(f"model.hidden_size: {hidden} is not divisible by model.num_heads={heads}")
    if model.qk_norm not in (None, "rms"):
        problems.append(f"model.qk_norm: must be null or 'rms', got {model.qk_norm!r}")
    bad_layers = [i for i in model.dual_attention_layers if not 0 <= i < model.depth]
    if bad_layers:
        problems.append(f"model.dual_attention_layers: {bad_layers} outside 0..{model.depth - 1}")
    if model.in_channels != vae.latent_channels:
        problems.append(f"model.in_channels={model.in_channels} differs from vae.latent_channels={vae.latent_channels}")
    if model.context_dim != text.t5.d_model:
        problems.append(f"model.context_dim={model.context_dim} differs from text.t5.d_model={text.t5.d_model}")
    pooled = text.clip_l.projection_dim + text.clip_g.projection_dim
    if model.pooled_dim != pooled:
        problems.append(f"model.pooled_dim={model.pooled_dim} differs from text.clip_l.projection_dim + "
                        f"text.clip_g.projection_dim = {pooled}")
    clip_width = text.clip_l.hidden_size + text.clip_g.hidden_size
    if clip_width > text.t5.d_model:
        problems.append(f"text.clip_l.hidden_size + text.clip_g.hidden_size = {clip_width} exceeds "
                        f"text.t5.d_model={text.t5.d_model} (CLIP context is zero-padded to the T5 width)")
    for name in ("dropout_clip_l", "dropout_clip_g", "dropout_t5"):
        _in_range(problems, f"text.{name}", getattr(text, name), 0.0, 1.0)
    downsample = 2 ** (len(vae.block_out_channels) - 1)
    multiple = downsample * model.patch_size
    if data.resolution % multiple:
        problems.append(f"data.resolution={data.resolution} is not a multiple of {multiple} "
                        f"(VAE downsampling {downsample} x model.patch_size {model.patch_size})")
    elif data.resolution // multiple > model.pos_embed_max_size:
        problems.append(f"data.resolution={data.resolution} gives a {data.resolution // multiple}-patch grid, "
                        f"larger than model.pos_embed_max_size={model.pos_embed_max_size}")
    region = model.pos_embed_crop_region
    if region is not None:
        if not model.pos_embed_random_crop:
            problems.append("model.pos_embed_crop_region: set, but model.pos_embed_random_crop is false")
        elif not 1 <= region <= model.pos_embed_max_size:
            problems.append(f"model.pos_embed_crop_region: {region} is outside 1..model.pos_embed_max_size="
                            f"{model.pos_embed_max_size}")
        elif data.resolution % multiple == 0 and data.resolution // multiple > region:
            problems.append(f"model.pos_embed_crop_region={region} is smaller than the {data.resolution // multiple}-"
                            f"patch grid of data.resolution={data.resolution}")
    diffusion = cfg.diffusion
    if diffusion.density not in DENSITIES:
        problems.append(f"diffusion.density: {diffusion.density!r} is not one of {', '.join(DENSITIES)}")
    if diffusion.shift <= 0:
        problems.append(f"diffusion.shift: must be > 0, got {diffusion.shift}")
    if diffusion.logit_std <= 0:
        problems.append(f"diffusion.logit_std: must be > 0, got {diffusion.logit_std}")
    if diffusion.num_loss_bins < 1:
        problems.append(f"diffusion.num_loss_bins: must be >= 1, got {diffusion.num_loss_bins}")
    if diffusion.sampler.uncond not in UNCOND_MODES:
        problems.append(f"diffusion.sampler.uncond: {diffusion.sampler.uncond!r} is not one of {', '.join(UNCOND_MODES)}")
    if diffusion.sampler.num_steps < 1:
        problems.append(f"diffusion.sampler.num_steps: must be >= 1, got {diffusion.sampler.num_steps}")
    problems.extend(skip_layer_problems(diffusion.sampler, model.depth, "diffusion.sampler."))
    problems.extend(model_option_problems(cfg))
    problems.extend(adapter_problems(cfg))
    problems.extend(text_adapter_problems(cfg))
    problems.extend(data_problems(cfg, multiple))
    problems.extend(strategy_problems(cfg))
    problems.extend(trainer_problems(cfg))
    if data.batch_size < 1:
        problems.append(f"data.batch_size: must be >= 1, got {data.batch_size}")
    if data.num_workers < 0:
        problems.append(f"data.num_workers: must be >= 0, got {data.num_workers}")
    if data.latent_cache_max_samples < 1:
        problems.append(f"data.latent_cache_max_samples: must be >= 1, got {data.latent_cache_max_samples}")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas: expected 2 values, got {len(cfg.optim.betas)}")
    if cfg.optim.warmup_steps < 0:
        problems.append(f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule: must be one of {list(SCHEDULES)}, got {cfg.optim.schedule!r}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        problems.append(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    _in_range(problems, "ema.decay", cfg.ema.decay, 0.0, 1.0)
    trainer = cfg.trainer
    if trainer.max_steps < 1:
        problems.append(f"trainer.max_steps: must be >= 1, got {trainer.max_steps}")
    if trainer.precision not in PRECISIONS:
        problems.append(f"trainer.precision: {trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
    # A checkpoint is a step directory (checkpoints/step-NNNNNNN, checkpoints/last), a .ckpt file, or
    # a DeepSpeed .ckpt directory; sd3train.checkpoint.step_dirs.resume_checkpoint checks a step directory is complete.
    if trainer.resume not in ("auto", "never") and not Path(trainer.resume).exists():
        problems.append(f"trainer.resume: {trainer.resume!r} is neither 'auto', 'never' nor an existing checkpoint "
                        "(a step directory, checkpoints/last or a .ckpt)")
    if cfg.logger.wandb_mode not in WANDB_MODES:
        problems.append(f"logger.wandb_mode: {cfg.logger.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}")
    problems.extend(missing_weight_paths(cfg))
    problems.extend(training_cache_problems(cfg))
    problems.extend(eval_problems(cfg.eval))
    return problems


def weight_paths(cfg: TrainConfig) -> dict[str, Optional[str]]:
    """Every config key that names weights to load, with its value (None: not set)."""
    text = cfg.text
    return {
        "paths.pretrained": cfg.paths.pretrained,
        "model.weights": cfg.model.weights,
        "model.adapter_weights": cfg.model.adapter_weights,
        "vae.weights": cfg.vae.weights,
        "text.weights": text.weights,
        "text.clip_l_weights": text.clip_l_weights,
        "text.clip_g_weights": text.clip_g_weights,
        "text.t5_weights": text.t5_weights,
    }


def missing_weight_paths(cfg: TrainConfig) -> list[str]:
    """One problem per weights path that does not exist (relative paths start at the repo root, as
    the loaders read them). An interpolated path (vae.weights: ${paths.pretrained}) is named once."""
    problems, reported = [], set()
    for key, value in weight_paths(cfg).items():
        if value is None or value in reported or resolve_repo_path(value).exists():
            continue
        reported.add(value)
        problems.append(f"{key}: {value} does not exist")
    return problems


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """Resolve, type-check and cross-check a composed config; raise ConfigError listing every problem."""
    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception as error:  # list every interpolation that cannot resolve, naming its key
            raise ConfigError(unresolvable_problems(cfg) or [str(error).splitlines()[0]]) from error
    else:
        plain = cfg
    plain = upgrade_retired_values({key: value for key, value in plain.items() if key != "hydra"})
    typed, problems = build_typed(TrainConfig, plain)
    if not problems:
        problems = cross_field_problems(typed)
    if problems:
        raise ConfigError(problems)
    return typed
