"""Fit the tiny 16-channel VAE that the CPU smoke tests and the shapes experiments train on.

    python -m sd3train.tools.fit_tiny_vae --out data/vae_tiny --conf conf/vae/tiny.yaml
    python -m sd3train.tools.fit_tiny_vae --out /tmp/vae4 --block-out-channels 16 32 64   # downsampling 4
    python -m sd3train.tools.fit_tiny_vae --world compose --out data/vae_compose --conf conf/vae/tiny_compose.yaml

Single process, fixed seeds, two CPU threads: about 7 minutes on two idle cores (60% of the
steps on 32x32 renders, the rest on 64x64; the same seeds give the same weights). It trains on
procedural shapes (`sd3train.data.shapes.make_sample`) with L1 + MSE + 1e-6 KL, then:
  1. measures the latent normalisation on fresh images: shift = mean of the posterior means,
     scale = 1 / their std (SD3's scalar shift/scale, measured for this VAE);
  2. writes `vae.safetensors`, `config.json` (VAEConfig fields) and `fit_report.json` to --out,
     and with --conf the Hydra group file;
  3. reloads the written weights and checks that reconstructions keep the shape and its colour
     (sd3train.eval), since a diffusion model trained on these latents is judged on both.

`--world compose` fits the same layout on the multi-object scenes (sd3train.data.scenes, all
categories mixed, with --shapes-share of one-object shapes images) for 4000 steps, about 9 minutes
on two idle cores; it measures shift/scale on scenes and checks instead the share of round trips
that still satisfy their caption, per category (sd3train.eval.compose), since a model trained on
those latents is scored that way. `python -m sd3train.tools.check_compose_scorer --vae` rechecks it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sd3train.checkpoint.components import vae_from_config
from sd3train.config.schema import VAEConfig
from sd3train.data.scenes import CATEGORIES, make_scene_sample
from sd3train.data.shapes import image_to_array, make_sample, parse_caption
from sd3train.eval.colour import dominant_colour
from sd3train.eval.compose import satisfies
from sd3train.eval.shape import dominant_shape
from sd3train.model.vae import VAE
from sd3train.paths import REPO_ROOT

# Disjoint procedural streams (the dataset base seed) for fitting, normalisation stats and evaluation.
FIT_SEED = 910_001
STATS_SEED = 910_002
EVAL_SEED = 910_003
IMAGE_SIZE = 64
LOW_RES_SIZE = 32

TINY = dict(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=8, latent_channels=16)

# (seed, start, count, size) -> (count, 3, size, size) images in [-1, 1] and their captions.
ImageSource = Callable[[int, int, int, int], tuple[torch.Tensor, list[str]]]


def as_batch(samples: list) -> tuple[torch.Tensor, list[str]]:
    """(image, caption) pairs -> (B, 3, H, W) float images in [-1, 1] and the captions."""
    arrays = np.stack([image_to_array(image) for image, _ in samples])  # (B, H, W, 3) uint8
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return pixels.float() / 127.5 - 1.0, [caption for _, caption in samples]


def shape_images(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """(count, 3, size, size) float images in [-1, 1] and their captions."""
    return as_batch([make_sample(seed, index, size) for index in range(start, start + count)])


def scene_images(seed: int, start: int, count: int, size: int = IMAGE_SIZE, shapes_share: float = 0.0,
                 category: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """Like shape_images, from the compose world (`category`, or all mixed); with `shapes_share`, that
    share of the indices (drawn from each index's own stream) are one-object shapes images instead."""
    samples = []
    for index in range(start, start + count):
        if shapes_share > 0.0 and random.Random(f"vae-fit-mix-{seed}-{index}").random() < shapes_share:
            samples.append(make_sample(seed, index, size))
        else:
            samples.append(make_scene_sample(seed, index, size, category))
    return as_batch(samples)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding the way an image file would."""
    pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak: a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    mean, logvar = vae.encode_moments(images)
    noise = torch.randn(mean.shape, generator=generator)
    reconstruction = vae.decoder(mean + torch.exp(0.5 * logvar) * noise)
    l1 = (reconstruction - images).abs().mean()
    mse = (reconstruction - images).pow(2).mean()
    # KL to N(0, I) summed per image as in LDM; dividing by the pixel values per image puts it on the
    # same per-element scale as l1/mse, so kl_weight means what LDM's 1e-6 means.
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    kl_scaled = kl / images[0].numel()
    return {"loss": l1 + mse + kl_weight * kl_scaled, "l1": l1, "mse": mse, "kl": kl}


def fit(vae: VAE, steps: int, low_res_steps: int, batch_size: int, lr: float, kl_weight: float,
        seed: int, images_from: ImageSource = shape_images) -> list[dict[str, float]]:
    """AdamW on L1 + MSE + kl_weight * KL on `images_from(FIT_SEED, ...)`; the first `low_res_steps`
    steps use 32x32 renders."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    history = []
    running: dict[str, float] = {}
    start = time.perf_counter()
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        # Every step sees new images: the data is procedural and unlimited. Early steps draw the
        # shapes at half size: a quarter of the compute per image for the same flat-colour-and-edge
        # content, so the convolutions see four times as many shapes within the time budget.
        size = LOW_RES_SIZE if step < low_res_steps else IMAGE_SIZE
        images, _ = images_from(FIT_SEED, step * batch_size, batch_size, size)
        losses = vae_loss(vae, images, kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + value.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            count = (step % 50) + 1
            record = {"step": step + 1, "size": size, "seconds": round(time.perf_counter() - start, 1),
                      **{name: total / count for name, total in running.items()}}
            history.append(record)
            running = {}
            print(f"step {step + 1:5d}  {record['seconds']:6.0f}s  {size}px  loss {record['loss']:.4f}  "
                  f"l1 {record['l1']:.4f}  mse {record['mse']:.5f}  kl {record['kl']:.1f}", flush=True)
    vae.eval()
    return history


@torch.no_grad()
def latent_statistics(vae: VAE, num_images: int, batch_size: int = 64,
                      images_from: ImageSource = shape_images) -> tuple[float, float]:
    """Scalar mean and std of the raw posterior means over `num_images` fresh 64x64 images."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, num_images, batch_size):
        images, _ = images_from(STATS_SEED, start, min(batch_size, num_images - start), IMAGE_SIZE)
        mean, _ = vae.encode_moments(images)
        mean = mean.double()
        total += float(mean.sum())
        total_sq += float(mean.pow(2).sum())
        count += mean.numel()
    shift = total / count
    std = math.sqrt(total_sq / count - shift**2)
    return shift, std


@torch.no_grad()
def evaluate(vae: VAE, num_images: int, sample: bool = False) -> dict[str, float]:
    """Colour and shape kept (sd3train.eval) and PSNR of decode(encode(x, sample)) on fresh images."""
    images, captions = shape_images(EVAL_SEED, 0, num_images)
    reconstructions = vae.decode(vae.encode(images, sample=sample, generator=torch.Generator().manual_seed(0)))
    originals, decoded = to_uint8(images), to_uint8(reconstructions)
    specs = [parse_caption(caption) for caption in captions]
    hits = sum(dominant_colour(image) == spec.colour for image, spec in zip(decoded, specs))
    shape_hits = sum(dominant_shape(image) == spec.shape for image, spec in zip(decoded, specs))
    squared_error = squared_errors(originals, decoded)
    psnr = 10.0 * np.log10(255.0**2 / np.maximum(squared_error, 1e-10))
    return {
        "colour_hits": int(hits),
        "shape_hits": int(shape_hits),
        "num_images": num_images,
        "psnr_mean_db": float(psnr.mean()),
        "psnr_min_db": float(psnr.min()),
        "psnr_of_mean_mse_db": float(10.0 * np.log10(255.0**2 / squared_error.mean())),
    }


def squared_errors(originals: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Mean squared error per image of (B, H, W, 3) uint8 batches, in 0-255 units."""
    return ((originals.astype(np.float64) - decoded.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))


@torch.no_grad()
def evaluate_compose(vae: VAE, images_per_category: int, sample: bool = False) -> dict:
    """Per category, the share of decode(encode(x, sample)) of fresh scenes that still satisfy their
    caption (sd3train.eval.compose); "worst" is the lowest share, PSNR over all of them."""
    shares, errors = {}, []
    for category in CATEGORIES:
        images, captions = scene_images(EVAL_SEED, 0, images_per_category, category=category)
        latents = vae.encode(images, sample=sample, generator=torch.Generator().manual_seed(0))
        originals, decoded = to_uint8(images), to_uint8(vae.decode(latents))
        shares[category] = float(np.mean([satisfies(image, caption) for image, caption in zip(decoded, captions)]))
        errors.append(squared_errors(originals, decoded))
    squared_error = np.concatenate(errors)
    psnr = 10.0 * np.log10(255.0**2 / np.maximum(squared_error, 1e-10))
    return {"satisfied": shares, "worst": min(shares.values()), "images_per_category": images_per_category,
            "psnr_mean_db": float(psnr.mean()), "psnr_min_db": float(psnr.min())}


def config_weights_path(weights_file: Path) -> str:
    """Repo-relative when the file is inside the repository, so the config works from any checkout."""
    try:
        return weights_file.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(weights_file.resolve())


def conf_comment(report: dict) -> list[str]:
    """The Hydra group file's header: how the VAE was fitted and what its round trip keeps."""
    quality = report["eval"]
    if report.get("world", "shapes") == "shapes":
        return [
            "# Tiny 16-channel VAE fitted on 64x64 shapes by `python -m sd3train.tools.fit_tiny_vae`.",
            f"# shift/scale measured on {report['stats_images']} images; reconstructions keep the shape colour "
            f"{quality['colour_hits']}/{quality['num_images']} and the shape "
            f"{quality['shape_hits']}/{quality['num_images']}, PSNR {quality['psnr_mean_db']:.1f} dB.",
        ]
    shares = ", ".join(f"{category} {share:.3f}" for category, share in quality["satisfied"].items())
    return [
        f"# Tiny 16-channel VAE fitted on 64x64 compose scenes ({report['shapes_share']:.0%} one-object shapes) by",
        f"# `{report['command']}` ({report['fit_seconds']:.0f} s).",
        f"# shift/scale measured on {report['stats_images']} scenes; share of round trips (posterior mean) that still",
        f"# satisfy their caption, {quality['images_per_category']} scenes per category (sd3train/eval/compose.py):",
        f"# {shares}; PSNR {quality['psnr_mean_db']:.1f} dB.",
    ]


def write_conf_yaml(path: Path, cfg: VAEConfig, report: dict) -> None:
    lines = [
        *conf_comment(report),
        f"latent_channels: {cfg.latent_channels}",
        f"in_channels: {cfg.in_channels}",
        f"block_out_channels: [{', '.join(str(width) for width in cfg.block_out_channels)}]",
        f"layers_per_block: {cfg.layers_per_block}",
        f"norm_num_groups: {cfg.norm_num_groups}",
        f"shift_factor: {cfg.shift_factor!r}",
        f"scaling_factor: {cfg.scaling_factor!r}",
        f"weights: {cfg.weights}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# Per-world defaults of the options given as None; the shapes ones fitted data/vae_tiny. Compose,
# judged on 300 scenes per category by check_compose_scorer (lowest share of the six categories):
# 2300 steps gave 0.987 (0.983 with 30% of them at 32 px), 4000 gave 1.000 everywhere.
WORLD_DEFAULTS = {
    "shapes": dict(steps=2300, low_res_fraction=0.6, lr=2e-3, eval_images=64,
                   block_out_channels=TINY["block_out_channels"]),
    # Downsampling 4 (a 16x16 latent at 64 px), so the compose world's small objects span 5 to 6.5
    # latent cells (data/vae_compose, conf/vae/tiny_compose.yaml).
    "compose": dict(steps=4000, low_res_fraction=0.6, lr=2e-3, shapes_share=0.2, eval_images=100,
                    block_out_channels=[16, 32, 64]),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for vae.safetensors, config.json and fit_report.json")
    parser.add_argument("--conf", type=Path, default=None, help="also write this Hydra vae group file")
    parser.add_argument("--world", choices=sorted(WORLD_DEFAULTS), default="shapes",
                        help="shapes: one object per image (data/vae_tiny); compose: sd3train.data.scenes")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps in all")
    parser.add_argument("--low-res-fraction", type=float, default=None,
                        help="fraction of the steps (the first ones) on 32x32 renders; the rest are 64x64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--shapes-share", type=float, default=None,
                        help="compose: share of the fit images that are one-object shapes images")
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=None,
                        help="encoder widths, one per level: n levels downsample by 2^(n-1) "
                             "(shapes 16 32 64 64, compose 16 32 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stats-images", type=int, default=1024)
    parser.add_argument("--eval-images", type=int, default=None, help="shapes: in all; compose: per category")
    args = parser.parse_args(argv)
    for name, value in WORLD_DEFAULTS[args.world].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    compose = args.world == "compose"
    if compose and not 0.0 <= args.shapes_share < 1.0:
        parser.error(f"--shapes-share must be in [0, 1), got {args.shapes_share}")
    fit_images = partial(scene_images, shapes_share=args.shapes_share) if compose else shape_images
    # Normalisation is measured on what a diffusion model will train on: scenes only.
    stats_images = scene_images if compose else shape_images

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, start_cpu = time.perf_counter(), time.process_time()

    layout = {**TINY, "block_out_channels": list(args.block_out_channels)}
    vae = VAE(**layout, shift_factor=0.0, scaling_factor=1.0)
    low_res_steps = int(round(args.low_res_fraction * args.steps))
    history = fit(vae, args.steps, low_res_steps, args.batch_size, args.lr, args.kl_weight, args.seed, fit_images)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu

    shift, std = latent_statistics(vae, args.stats_images, images_from=stats_images)
    args.out.mkdir(parents=True, exist_ok=True)
    weights_file = args.out / "vae.safetensors"
    cfg = VAEConfig(**layout, shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6),
                    weights=config_weights_path(weights_file))
    state = {key: tensor.detach().contiguous() for key, tensor in vae.state_dict().items()}
    save_file(state, str(weights_file), metadata={"format": "pt", "config": json.dumps(asdict(cfg))})
    (args.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    # Judge the files as written, loaded the way training will load them.
    shipped = vae_from_config(VAEConfig(**{**asdict(cfg), "weights": str(weights_file.resolve())}))
    judge = evaluate_compose if compose else evaluate
    quality = judge(shipped, args.eval_images)
    # Sampled latents are what training sees; the decoder should not care about the posterior noise.
    quality_sampled = judge(shipped, args.eval_images, sample=True)
    total_seconds = time.perf_counter() - start

    report = {
        "config": asdict(cfg),
        "steps": args.steps,
        "low_res_steps": low_res_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kl_weight": args.kl_weight,
        "seed": args.seed,
        "threads": args.threads,
        "seeds": {"fit": FIT_SEED, "stats": STATS_SEED, "eval": EVAL_SEED},
        "fit_seconds": round(fit_seconds, 1),
        # CPU seconds of all threads: comparable across runs when other work shares the cores.
        "fit_cpu_seconds": round(fit_cpu_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "final_losses": history[-1],
        "history": history,
        "stats_images": args.stats_images,
        "latent_mean": shift,
        "latent_std": std,
        "eval": quality,
        "eval_sampled_latents": quality_sampled,
        "weights_bytes": weights_file.stat().st_size,
        "torch": torch.__version__,
    }
    if compose:  # the shapes report keeps its keys
        command = ["python", "-m", "sd3train.tools.fit_tiny_vae", *(sys.argv[1:] if argv is None else argv)]
        report.update(world=args.world, shapes_share=args.shapes_share, command=shlex.join(command))
    (args.out / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.conf is not None:
        write_conf_yaml(args.conf, cfg, report)
    if compose:
        kept = ", ".join(f"{category} {share:.3f}" for category, share in quality["satisfied"].items())
    else:
        kept = (f"colour {quality['colour_hits']}/{quality['num_images']}, "
                f"shape {quality['shape_hits']}/{quality['num_images']}")
    print(f"fit {fit_seconds:.0f}s, total {total_seconds:.0f}s; shift {cfg.shift_factor} scale {cfg.scaling_factor}; "
          f"{kept}, PSNR {quality['psnr_mean_db']:.2f} dB; {report['weights_bytes'] / 1e6:.2f} MB")
    return report


if __name__ == "__main__":
    main()
