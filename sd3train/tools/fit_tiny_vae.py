"""Fit the tiny 16-channel VAE that the CPU smoke tests and the shapes experiments train on.

    python -m sd3train.tools.fit_tiny_vae --out data/vae_tiny --conf conf/vae/tiny.yaml
    python -m sd3train.tools.fit_tiny_vae --out /tmp/vae4 --block-out-channels 16 32 64   # downsampling 4

Single process, fixed seeds, two CPU threads: about 7 minutes on two idle cores (60% of the
steps on 32x32 renders, the rest on 64x64; the same seeds give the same weights). It trains on
procedural shapes (`sd3train.data.shapes.make_sample`) with L1 + MSE + 1e-6 KL, then:
  1. measures the latent normalisation on fresh images: shift = mean of the posterior means,
     scale = 1 / their std (SD3's scalar shift/scale, measured for this VAE);
  2. writes `vae.safetensors`, `config.json` (VAEConfig fields) and `fit_report.json` to --out,
     and with --conf the Hydra group file;
  3. reloads the written weights and checks that reconstructions keep the shape and its colour
     (sd3train.eval), since a diffusion model trained on these latents is judged on both.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sd3train.checkpoint.components import vae_from_config
from sd3train.config.schema import VAEConfig
from sd3train.data.shapes import image_to_array, make_sample, parse_caption
from sd3train.eval.colour import dominant_colour
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


def shape_images(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """(count, 3, size, size) float images in [-1, 1] and their captions."""
    arrays, captions = [], []
    for index in range(start, start + count):
        image, caption = make_sample(seed, index, size)
        arrays.append(image_to_array(image))
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return pixels.float() / 127.5 - 1.0, captions


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
        seed: int) -> list[dict[str, float]]:
    """AdamW on L1 + MSE + kl_weight * KL; the first `low_res_steps` steps use 32x32 renders."""
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
        images, _ = shape_images(FIT_SEED, step * batch_size, batch_size, size)
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
def latent_statistics(vae: VAE, num_images: int, batch_size: int = 64) -> tuple[float, float]:
    """Scalar mean and std of the raw posterior means over `num_images` fresh images."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, num_images, batch_size):
        images, _ = shape_images(STATS_SEED, start, min(batch_size, num_images - start))
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
    squared_error = ((originals.astype(np.float64) - decoded.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10.0 * np.log10(255.0**2 / np.maximum(squared_error, 1e-10))
    return {
        "colour_hits": int(hits),
        "shape_hits": int(shape_hits),
        "num_images": num_images,
        "psnr_mean_db": float(psnr.mean()),
        "psnr_min_db": float(psnr.min()),
        "psnr_of_mean_mse_db": float(10.0 * np.log10(255.0**2 / squared_error.mean())),
    }


def config_weights_path(weights_file: Path) -> str:
    """Repo-relative when the file is inside the repository, so the config works from any checkout."""
    try:
        return weights_file.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(weights_file.resolve())


def write_conf_yaml(path: Path, cfg: VAEConfig, report: dict) -> None:
    lines = [
        "# Tiny 16-channel VAE fitted on 64x64 shapes by `python -m sd3train.tools.fit_tiny_vae`.",
        f"# shift/scale measured on {report['stats_images']} images; reconstructions keep the shape colour "
        f"{report['eval']['colour_hits']}/{report['eval']['num_images']} and the shape "
        f"{report['eval']['shape_hits']}/{report['eval']['num_images']}, "
        f"PSNR {report['eval']['psnr_mean_db']:.1f} dB.",
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for vae.safetensors, config.json and fit_report.json")
    parser.add_argument("--conf", type=Path, default=None, help="also write this Hydra vae group file")
    parser.add_argument("--steps", type=int, default=2300, help="optimizer steps in all")
    parser.add_argument("--low-res-fraction", type=float, default=0.6,
                        help="fraction of the steps (the first ones) on 32x32 renders; the rest are 64x64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=TINY["block_out_channels"],
                        help="encoder widths, one per level: n levels downsample by 2^(n-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stats-images", type=int, default=1024)
    parser.add_argument("--eval-images", type=int, default=64)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, start_cpu = time.perf_counter(), time.process_time()

    layout = {**TINY, "block_out_channels": list(args.block_out_channels)}
    vae = VAE(**layout, shift_factor=0.0, scaling_factor=1.0)
    low_res_steps = int(round(args.low_res_fraction * args.steps))
    history = fit(vae, args.steps, low_res_steps, args.batch_size, args.lr, args.kl_weight, args.seed)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu

    shift, std = latent_statistics(vae, args.stats_images)
    args.out.mkdir(parents=True, exist_ok=True)
    weights_file = args.out / "vae.safetensors"
    cfg = VAEConfig(**layout, shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6),
                    weights=config_weights_path(weights_file))
    state = {key: tensor.detach().contiguous() for key, tensor in vae.state_dict().items()}
    save_file(state, str(weights_file), metadata={"format": "pt", "config": json.dumps(asdict(cfg))})
    (args.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    # Judge the files as written, loaded the way training will load them.
    shipped = vae_from_config(VAEConfig(**{**asdict(cfg), "weights": str(weights_file.resolve())}))
    quality = evaluate(shipped, args.eval_images)
    # Sampled latents are what training sees; the decoder should not care about the posterior noise.
    quality_sampled = evaluate(shipped, args.eval_images, sample=True)
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
    (args.out / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.conf is not None:
        write_conf_yaml(args.conf, cfg, report)
    print(f"fit {fit_seconds:.0f}s, total {total_seconds:.0f}s; shift {cfg.shift_factor} scale {cfg.scaling_factor}; "
          f"colour {quality['colour_hits']}/{quality['num_images']}, "
          f"shape {quality['shape_hits']}/{quality['num_images']}, PSNR {quality['psnr_mean_db']:.2f} dB; "
          f"{report['weights_bytes'] / 1e6:.2f} MB")
    return report


if __name__ == "__main__":
    main()
