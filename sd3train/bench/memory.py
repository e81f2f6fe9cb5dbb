"""Resident GPU memory of DDP training, per component, and the largest per-GPU batch that fits.

    python -m sd3train.bench.memory                                  # SD3-Medium and SD3.5-Large, 512^2, 80 GB
    python -m sd3train.bench.memory --model sd3_medium --resolution 1024 --gpu-gb 141 --json

Everything is counted on the meta device or on fake tensors, so it runs on a laptop in seconds and
is exact for the shipped configs. Per component, for `trainer.precision` bf16-mixed (fp32
weights, bf16 autocast; 32-true is the same without autocast):

    MM-DiT weights and buffers   fp32 (the position table is a buffer)
    gradients                    fp32, one per weight, held in DDP's all-reduce buckets
                                 (sd3train/lit/strategy.py sets gradient_as_bucket_view, so there is
                                 no second copy)
    AdamW moments                2 x fp32 per weight
    EMA copy                     fp32 weights and buffers (a deep copy of the MM-DiT)
    frozen encoders              CLIP-L, OpenCLIP bigG, T5-XXL and the VAE encoder and decoder in the
                                 frozen dtype (trainer.frozen_dtype=auto: bf16) when the step encodes
                                 online; with the precompute cache (data=cached) only the VAE decoder
                                 (previews), the text encoders being built on the CPU when needed
    reserve                      CUDA context, NCCL buffers, allocator fragmentation, the
                                 optimizer's temporaries (--reserve-gb, default 4)
    activations                  sd3train/bench/activations.py: the real MM-DiT's forward on fake
                                 tensors, counted per sample and per activation-checkpointing mode

The activation peak is the larger of the forward's end (autocast's bf16 weight copies included)
and the backward's start plus one block's recomputation; gradients are counted as if all
existed at the backward's start, so the largest batch is a lower bound. GB are 10^9 bytes.
Tests: `python -m pytest tests/unit/bench/test_memory.py -q`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import torch

from sd3train.bench.activations import ActivationProfile, activation_profile
from sd3train.config.compose import group_option
from sd3train.config.schema import CLIPEncoderConfig, ModelConfig, T5EncoderConfig, VAEConfig
from sd3train.config.typed import ConfigError, build_typed
from sd3train.model.activation_checkpointing import ACTIVATION_CHECKPOINTING
from sd3train.model.mmdit import MMDiT
from sd3train.model.text_encoders import clip_text_config, t5_encoder_config
from sd3train.model.vae import VAE
from sd3train.paths import CONF_DIR

PROG = "python -m sd3train.bench.memory"
GB = 1e9
T5_V11_TOKENS = 32_100  # the T5 v1.1 sentencepiece vocabulary SD3 uses (32,128 embedding rows)
PRECISIONS = ("bf16-mixed", "32-true")
MAX_BATCH = 4096


def typed(cls: type, data: dict, prefix: str):
    value, problems = build_typed(cls, data, prefix=prefix)
    if problems:
        raise ConfigError(problems)
    return value


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml, checked against the schema."""
    if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
        names = ", ".join(sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
        raise ConfigError([f"--model: no {name}.yaml in conf/model (there are: {names})"])
    return typed(ModelConfig, group_option("model", name), "model.")


def checkpointing_modes(config: ModelConfig) -> tuple[str, ...]:
    """The activation-checkpointing modes (model.activation_checkpointing), `none` first."""
    return ACTIVATION_CHECKPOINTING


def with_checkpointing(config: ModelConfig, mode: str) -> ModelConfig:
    """`config` with activation checkpointing `mode`, and not compiled (the forward runs on fake tensors)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    return dataclasses.replace(config, activation_checkpointing=mode, compile=False)


def mmdit_counts(config: ModelConfig) -> tuple[int, int]:
    """(parameters, buffer elements) of the MM-DiT, built on the meta device."""
    with torch.device("meta"):
        model = MMDiT.from_config(with_checkpointing(config, "none"))
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def encoder_parameters(text: str = "sd3", vae: str = "sd3") -> dict[str, int]:
    """Parameters of each frozen encoder of conf/text/<text>.yaml and conf/vae/<vae>.yaml, on meta."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    text_data, vae_data = group_option("text", text), group_option("vae", vae)
    counts = {}
    with torch.device("meta"):
        for name in ("clip_l", "clip_g"):
            clip = typed(CLIPEncoderConfig, text_data[name], f"text.{name}.")
            counts[name] = CLIPTextModelWithProjection(clip_text_config(clip))
        t5 = typed(T5EncoderConfig, text_data.get("t5", {}), "text.t5.")
        counts["t5"] = T5EncoderModel(t5_encoder_config(t5, T5_V11_TOKENS))
        autoencoder = VAE.from_config(typed(VAEConfig, vae_data, "vae."))
        counts["vae_encoder"], counts["vae_decoder"] = autoencoder.encoder, autoencoder.decoder
    return {name: sum(p.numel() for p in module.parameters()) for name, module in counts.items()}


def resident_components(parameters: int, buffers: int, encoders: dict[str, int], precision: str,
                        cached: bool) -> dict[str, int]:
    """Bytes of everything but activations for DDP training (see the module docstring)."""
    weight = 4  # fp32 weights under both precisions (bf16-mixed autocasts, it does not store bf16)
    frozen = 2 if precision.startswith("bf16") else 4
    return {
        "mmdit_weights": weight * (parameters + buffers),
        "gradients": weight * parameters,
        "adamw_moments": 2 * weight * parameters,
        "ema_copy": weight * (parameters + buffers),
        "frozen_encoders": frozen * (encoders.get("vae_decoder", 0) if cached else sum(encoders.values())),
    }


def largest_batch(budget: int, activations: ActivationProfile, without: ActivationProfile) -> int:
    """The largest batch whose activation peak is at most `budget` bytes (0 if none is)."""
    batch = 0
    while batch < MAX_BATCH and activations.peak(batch + 1, without) <= budget:
        batch += 1
    return batch


def account(model_name: str, image_size: tuple[int, int], precision: str, gpu_gb: float, reserve_gb: float,
            text_tokens: int = 154, latent_downsample: int = 8, encoders: Optional[dict[str, int]] = None,
            config: Optional[ModelConfig] = None, modes: Optional[Sequence[str]] = None) -> dict:
    """The whole accounting for one model (conf/model/<model_name>.yaml, or `config`) at `image_size`,
    for each of `modes` (default: every checkpointing mode; "none" is always measured)."""
    config = config or model_config(model_name)
    latent_h, latent_w = (side // latent_downsample for side in image_size)
    parameters, buffers = mmdit_counts(config)
    encoders = encoder_parameters() if encoders is None else encoders
    autocast = precision.startswith("bf16")
    profiles = {mode: activation_profile(with_checkpointing(config, mode), latent_h, latent_w, text_tokens, autocast)
                for mode in dict.fromkeys(["none", *(modes or checkpointing_modes(config))])}
    without = profiles["none"]
    result = {
        "model": model_name, "depth": config.depth, "parameters": parameters, "buffer_elements": buffers,
        "resolution": list(image_size), "latent": [latent_h, latent_w], "text_tokens": text_tokens,
        "precision": precision, "strategy": "ddp", "gpu_gb": gpu_gb, "reserve_gb": reserve_gb,
        "every_k": config.activation_checkpointing_every,
        "encoder_parameters": encoders, "components": {}, "activations": {},
    }
    for cached in (False, True):
        result["components"]["cached" if cached else "online"] = resident_components(
            parameters, buffers, encoders, precision, cached)
    for mode, profile in profiles.items():
        row = {
            "per_sample_gb": profile.backward.per_sample / GB,
            "recompute_per_sample_gb": profile.recompute(1, without) / GB - profile.recompute(0, without) / GB,
            "forward_fixed_gb": profile.forward.fixed / GB,
            "backward_fixed_gb": profile.backward.fixed / GB,
        }
        for data, components in result["components"].items():
            budget = int((gpu_gb - reserve_gb) * GB) - sum(components.values())
            batch = largest_batch(budget, profile, without)
            row[f"largest_batch_{data}"] = batch
            row[f"peak_gb_{data}"] = (sum(components.values()) + profile.peak(max(batch, 1), without)) / GB + reserve_gb
        result["activations"][mode] = row
    return result


def report(result: dict) -> str:
    height, width = result["resolution"]
    lines = [
        f"{result['model']}: depth {result['depth']}, {result['parameters'] / 1e9:.3f}B trainable parameters; "
        f"{height}x{width} (latents {result['latent'][0]}x{result['latent'][1]}, "
        f"{result['text_tokens']} text tokens), {result['precision']}, DDP, {result['gpu_gb']:g} GB GPU",
        "",
        f"{'component':44} {'online GB':>10} {'cached GB':>10}",
    ]
    names = {"mmdit_weights": "MM-DiT weights and buffers (fp32)",
             "gradients": "gradients (fp32, in DDP's buckets)", "adamw_moments": "AdamW moments (2 x fp32)",
             "ema_copy": "EMA copy (fp32)",
             "frozen_encoders": "frozen encoders (" + ("bf16" if result["precision"].startswith("bf16") else "fp32")
             + ")"}
    online, cached = result["components"]["online"], result["components"]["cached"]
    for key, name in names.items():
        lines.append(f"{name:44} {online[key] / GB:10.2f} {cached[key] / GB:10.2f}")
    lines.append(f"{'reserve (context, NCCL, fragmentation)':44} {result['reserve_gb']:10.2f} {result['reserve_gb']:10.2f}")
    lines.append(f"{'total before activations':44} {sum(online.values()) / GB + result['reserve_gb']:10.2f} "
                 f"{sum(cached.values()) / GB + result['reserve_gb']:10.2f}")
    encoders = ", ".join(f"{name} {count / 1e6:.0f}M" for name, count in result["encoder_parameters"].items())
    lines += [f"  (encoder parameters: {encoders})", "",
              f"{'activation checkpointing':25} {'GB/sample':>10} {'+recompute':>11} {'fixed fwd/bwd GB':>17} "
              f"{'max batch online':>17} {'max batch cached':>17}"]
    for mode, row in result["activations"].items():
        label = f"every_k (k={result['every_k']})" if mode == "every_k" else mode
        lines.append(f"{label:25} {row['per_sample_gb']:10.3f} {row['recompute_per_sample_gb']:11.3f} "
                     f"{row['forward_fixed_gb']:8.2f}/{row['backward_fixed_gb']:<8.2f} "
                     f"{row['largest_batch_online']:17d} {row['largest_batch_cached']:17d}")
    lines.append("  (GB/sample: held when the backward starts; +recompute: one block's recomputation on top; fixed: "
                 "autocast's bf16 weight copies at the forward's end / those autograd keeps)")
    if sum(cached.values()) / GB + result["reserve_gb"] > result["gpu_gb"]:
        lines.append(f"  Weights, gradients and optimizer states alone exceed {result['gpu_gb']:g} GB under DDP: "
                     "shard them with ZeRO (python -m sd3train.bench.zero_memory).")
    return "\n".join(lines)


def parse_resolution(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(sides) not in (1, 2) or any(side <= 0 or side % 16 for side in sides):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or HxW with positive multiples of 16")
    return (sides[0], sides[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="conf/model/<name>.yaml (repeatable); "
                        "default sd3_medium (depth 24) and sd35_large (depth 38)")
    parser.add_argument("--resolution", type=parse_resolution, default=(512, 512), help="pixels, N or HxW (default 512)")
    parser.add_argument("--text-tokens", type=int, default=154, help="context length (SD3: 77 CLIP + 77 T5)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--reserve-gb", type=float, default=4.0)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the tables")
    args = parser.parse_args(argv)
    if args.text_tokens < 1 or args.gpu_gb <= args.reserve_gb or args.reserve_gb < 0:
        parser.error("need --text-tokens >= 1 and 0 <= --reserve-gb < --gpu-gb")
    try:
        encoders = encoder_parameters()
        results = [account(name, args.resolution, args.precision, args.gpu_gb, args.reserve_gb, args.text_tokens,
                           encoders=encoders) for name in (args.model or ["sd3_medium", "sd35_large"])]
    except ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(report(result) for result in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
