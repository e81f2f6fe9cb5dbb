"""Measure the compose scorer (sd3train/eval/compose.py) on the compose world's own images.

    python -m sd3train.tools.check_compose_scorer --count 300 --vae data/vae_tiny/vae.safetensors
    python -m sd3train.tools.check_compose_scorer --count 50          # real images only, seconds

For each category, `--count` images from `make_scene_sample(seed, index, size, category)` are
scored against their own captions (real), after the VAE's encode (posterior mean) / decode round
trip when --vae is given (what a model generating through that decoder can at best show), and
against `swapped_captions` (the negative control, which should stay at most CHANCE). Prints a
Markdown table; about 1 s per 100 images, plus the VAE (2 CPU threads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sd3train.checkpoint.vae_loader import load_vae
from sd3train.data.scenes import CATEGORIES, make_scene_sample
from sd3train.data.shapes import image_to_array
from sd3train.eval.compose import CHANCE, satisfies, swapped_captions
from sd3train.paths import resolve_repo_path
from sd3train.tools.fit_tiny_vae import to_uint8

# A base seed of its own: neither make_shapes' train (0) nor val (1_000_000) stream.
CHECK_SEED = 920_001


def category_samples(category: str, count: int, seed: int, size: int) -> tuple[list[np.ndarray], list[str]]:
    samples = [make_scene_sample(seed, index, size, category) for index in range(count)]
    return [image_to_array(image) for image, _ in samples], [caption for _, caption in samples]


def load_round_trip_vae(path: str | Path) -> torch.nn.Module:
    """The VAE at `path`; a weights file with our config.json beside it (data/vae_tiny/vae.safetensors)
    is read through its folder, since the bare file does not say its norm group count."""
    path = resolve_repo_path(path)
    if path.is_file() and (path.parent / "config.json").is_file():
        path = path.parent
    return load_vae(path)


@torch.no_grad()
def vae_round_trip(vae: torch.nn.Module, images: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """decode(encode(x)) of (H, W, 3) uint8 images, with the posterior mean, as uint8 images."""
    decoded = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.stack(images[start:start + batch_size])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        decoded += list(to_uint8(vae.decode(vae.encode(pixels.float() / 127.5 - 1.0, sample=False))))
    return decoded


def measure(count: int, seed: int = CHECK_SEED, size: int = 64,
            vae: Optional[torch.nn.Module] = None) -> dict[str, dict[str, float]]:
    """Per category: the share of images satisfying their caption ("real", and "vae" with `vae`),
    the same for the swapped captions ("swapped", "swapped_vae") and "chance"."""
    results = {}
    for category in CATEGORIES:
        images, captions = category_samples(category, count, seed, size)
        swapped = swapped_captions(captions, seed)
        row = {"real": np.mean([satisfies(image, caption) for image, caption in zip(images, captions)]),
               "swapped": np.mean([satisfies(image, caption) for image, caption in zip(images, swapped)])}
        if vae is not None:
            decoded = vae_round_trip(vae, images)
            row["vae"] = np.mean([satisfies(image, caption) for image, caption in zip(decoded, captions)])
            row["swapped_vae"] = np.mean([satisfies(image, caption) for image, caption in zip(decoded, swapped)])
        row["chance"] = CHANCE[category]
        results[category] = {name: float(value) for name, value in row.items()}
    return results


COLUMNS = {"real": "real", "vae": "VAE round trip", "swapped": "swapped (real)",
           "swapped_vae": "swapped (VAE)", "chance": "chance"}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    columns = [name for name in COLUMNS if name in next(iter(results.values()))]
    lines = ["| category | " + " | ".join(COLUMNS[name] for name in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    rows = dict(results)
    rows["overall"] = {name: float(np.mean([row[name] for row in results.values()])) for name in columns}
    for category, row in rows.items():
        lines.append(f"| {category} | " + " | ".join(f"{row[name]:.3f}" for name in columns) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="images per category")
    parser.add_argument("--seed", type=int, default=CHECK_SEED, help="base seed of the images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--vae", default=None, help="also score after this VAE's round trip (a file or folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for the VAE")
    args = parser.parse_args(argv)
    if args.count <= 0 or args.size <= 0:
        parser.error("--count and --size must be positive")
    torch.set_num_threads(args.threads)
    vae = load_round_trip_vae(args.vae) if args.vae else None
    results = measure(args.count, args.seed, args.size, vae)
    print(f"{args.count} images per category, seed {args.seed}, {args.size} px"
          + (f", VAE {args.vae}" if args.vae else ""))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
