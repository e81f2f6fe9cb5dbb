"""Write the embedded "coloured shapes" dataset (or the multi-object "compose" world) as webdataset shards.

    python -m sd3train.tools.make_shapes --out data/shapes
    python -m sd3train.tools.make_shapes --out /tmp/shapes --train 1024 --val 64 --size 32
    python -m sd3train.tools.make_shapes --world compose --out data/compose    # sd3train.data.scenes

Produces `train-000000.tar ...` (train indices 0..N-1 of seed S), `val-000000.tar ...` (indices
0..M-1 of seed S + VAL_SEED_OFFSET, so validation images are held out), PNG by default, and
`manifest.json`, whose sources name the generator module. The output is byte-identical on every
machine. Re-running with the same arguments checks the manifest and the shards' sha256 and returns
at once; different arguments (another world among them) rebuild.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from sd3train.data.scenes import CATEGORIES, make_scene_sample
from sd3train.data.shapes import make_sample
from sd3train.data.tar_writer import read_manifest, verify_shards, write_shards

# Validation samples come from another base seed: the same indices give different images.
VAL_SEED_OFFSET = 1_000_000
# Each world: the module that draws it (recorded in the manifest) and its (seed, index, size) -> (image, caption).
WORLDS: dict[str, tuple[str, Callable]] = {
    "shapes": ("sd3train.data.shapes", make_sample),
    "compose": ("sd3train.data.scenes", make_scene_sample),
}


def _source(seed: int, count: int, size: int, samples_per_shard: int, image_format: str,
            world: str = "shapes", categories: tuple[str, ...] = ()) -> dict:
    """What the manifest records for one split; a re-run compares it to decide whether to rebuild."""
    # Recorded only when given, so the manifests of the whole world stay as they were.
    return {**({"categories": list(categories)} if categories else {}),
        "generator": WORLDS[world][0],
        "seed": seed,
        "count": count,
        "size": size,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
    }


def _samples(split: str, seed: int, count: int, size: int, world: str = "shapes",
             categories: tuple[str, ...] = ()) -> Iterator[tuple]:
    make = WORLDS[world][1]
    for index in range(count):
        image, caption = make(seed, index, size, categories=categories) if categories else make(seed, index, size)
        extra = {"index": index, "seed": seed, "split": split, "caption": caption, "width": size, "height": size}
        yield f"{split}-{index:09d}", image, caption, extra


def build_shapes(
    out: str | Path,
    train: int = 4096,
    val: int = 256,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 512,
    image_format: str = "png",
    world: str = "shapes",
    categories: tuple[str, ...] = (),
) -> bool:
    """Write the dataset of `world` (a key of WORLDS) into `out`, with the compose world's captions
    drawn from `categories` only when given; returns False when it was already up to date (nothing
    written)."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {sorted(WORLDS)}")
    if categories and world != "compose":
        raise ValueError(f"categories apply to the compose world only, not {world!r}")
    out = Path(out)
    splits = {
        "train": _source(seed, train, size, samples_per_shard, image_format, world, categories),
        "val": _source(seed + VAL_SEED_OFFSET, val, size, samples_per_shard, image_format, world, categories),
    }
    manifest = read_manifest(out)
    if manifest is not None and all(manifest.get("sources", {}).get(split) == source for split, source in splits.items()):
        ours = [entry for entry in manifest["shards"] if entry["name"].split("-")[0] in splits]
        if not verify_shards(out, ours, check_sha256=True):
            return False
    for split, source in splits.items():
        write_shards(
            _samples(split, source["seed"], source["count"], size, world, categories),
            out,
            prefix=split,
            samples_per_shard=samples_per_shard,
            image_format=image_format,
            source=source,
        )
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--world", choices=tuple(WORLDS), default="shapes",
                        help="one shape per image (shapes) or several, with the compose grammar (compose)")
    parser.add_argument("--train", type=int, default=4096, help="number of training samples")
    parser.add_argument("--val", type=int, default=256, help="number of validation samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the training split")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=(),
                        help="compose world: draw captions from these categories only (default: all six)")
    args = parser.parse_args(argv)
    if args.categories and args.world != "compose":
        parser.error("--categories needs --world compose")
    for name in ("train", "val", "size", "samples_per_shard"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    start = time.perf_counter()
    wrote = build_shapes(
        args.out, args.train, args.val, args.size, args.seed, args.samples_per_shard, args.image_format, args.world,
        tuple(args.categories)
    )
    seconds = time.perf_counter() - start
    manifest = read_manifest(args.out) or {"shards": []}
    total_bytes = sum(entry["bytes"] for entry in manifest["shards"])
    state = "wrote" if wrote else "up to date:"
    print(
        f"make_shapes: {state} {len(manifest['shards'])} shards, {total_bytes / 1e6:.1f} MB in {args.out} "
        f"({seconds:.2f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
