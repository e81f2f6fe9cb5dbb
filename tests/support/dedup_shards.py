"""Shards with planted near-duplicates, for the dedup tests: distinct photo-like images plus edited copies.

    planted = write_planted_shards(tmp_path, originals=270, copies=30, per_shard=50)
    planted.spec        # "tmp/planted-{000000..000005}.tar"
    planted.groups      # [["000000017", "000000203"], ...]: each original with its copies
    planted.clean       # keys of the originals that have no copy

Each original is its own smooth random colour field (a few random control points, bicubic) with
3-6 random ellipses, rectangles and triangles on top, at a random size, saved as JPEG quality 90. A
copy is its original with every edit applied: a crop of 2-5% off each side, a resize to 55-130%,
a colour shift (per-channel gain 0.85-1.15 and offset +-20) and JPEG quality 30-60. Copies are
spread among the shards (samples are shuffled before the keys are given out).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards


def distinct_image(rng: np.random.Generator) -> Image.Image:
    width, height = (int(side) for side in rng.integers(96, 193, size=2))
    control = rng.integers(0, 256, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    image = Image.fromarray(control).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(int(x) for x in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(y) for y in rng.integers(0, height, size=2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 4, y1 + 4), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1 + 4, y1 + 4), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1 + 4, y1 + 4)], fill=colour)
    return image


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Crop 2-5% per side, resize to 55-130%, shift the colours, JPEG at quality 30-60."""
    width, height = image.size
    left, right = (int(round(width * f)) for f in rng.uniform(0.02, 0.05, size=2))
    top, bottom = (int(round(height * f)) for f in rng.uniform(0.02, 0.05, size=2))
    image = image.crop((left, top, width - right, height - bottom))
    scale = float(rng.uniform(0.55, 1.3))
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-20, 20, size=3)
    return jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), int(rng.integers(30, 61)))


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class Planted:
    spec: str
    keys: list[str]  # every key, in shard order
    groups: list[list[str]]  # each original with its copies, keys sorted
    clean: list[str]  # originals without copies


def write_planted_shards(folder: Path, originals: int, copies: int, per_shard: int, seed: int = 0,
                         prefix: str = "planted", triples: int = 3) -> Planted:
    """`originals` distinct images and `copies` near-duplicates of some of them (`triples` of the
    copied originals get two copies, the others one)."""
    rng = np.random.default_rng(seed)
    images = [distinct_image(rng) for _ in range(originals)]
    copied = copies - triples  # originals with at least one copy
    if not 0 <= triples <= copied <= originals:
        raise ValueError(f"cannot plant {copies} copies ({triples} triples) among {originals} originals")
    chosen = rng.choice(originals, size=copied, replace=False)
    entries: list[tuple[int, bytes]] = [(index, jpeg(image, 90)) for index, image in enumerate(images)]
    for rank, index in enumerate(chosen):
        for _ in range(2 if rank < triples else 1):
            entries.append((int(index), near_duplicate(images[index], rng)))
    order = rng.permutation(len(entries))
    keys = [f"{position:09d}" for position in range(len(entries))]
    members: dict[int, list[str]] = {}
    samples = []
    for position, entry in enumerate(order):
        source, data = entries[entry]
        members.setdefault(source, []).append(keys[position])
        samples.append(ShardSample(keys[position], EncodedImage(data, "jpg"), f"image {source}"))
    write_shards(samples, folder, prefix=prefix, samples_per_shard=per_shard)
    count = -(-len(samples) // per_shard)
    groups = sorted(sorted(group) for group in members.values() if len(group) > 1)
    clean = sorted(group[0] for group in members.values() if len(group) == 1)
    return Planted(f"{folder}/{prefix}-{{000000..{count - 1:06d}}}.tar", keys, groups, clean)
