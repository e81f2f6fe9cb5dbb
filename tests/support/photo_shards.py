"""Photo-like test shards in the img2dataset layout: JPEGs of several aspect ratios, captions, synthetic sidecars.

    spec = write_photo_shards(tmp_path, count=200, per_shard=25)   # "tmp/photos-{000000..000007}.tar"
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from sd3train.data.tar_writer import EncodedImage, ShardSample, write_shards

# (width, height): square, landscape and portrait shapes, so a 64^2 bucket set gets several buckets.
PHOTO_SIZES = ((64, 64), (96, 56), (56, 96), (80, 72), (120, 60), (60, 120))


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus a coloured block) keeps files small and decodes like a photo.
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, 128)], -1)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top:top + height // 3, left:left + width // 3] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_samples(
    count: int, seed: int = 0, synthetic: bool = True, start: int = 0, sizes: tuple = PHOTO_SIZES
) -> list[ShardSample]:
    rng = random.Random(seed)
    samples = []
    for index in range(start, start + count):
        width, height = sizes[rng.randrange(len(sizes))]
        sidecars = {"syn.txt": f"synthetic caption {index}".encode()} if synthetic else None
        samples.append(ShardSample(
            key=f"{index:09d}",
            image=EncodedImage(jpeg_bytes(width, height, seed * 1_000_003 + index), "jpg"),
            caption=f"original caption {index}",
            extra={"width": width, "height": height},
            sidecars=sidecars,
        ))
    return samples


def write_photo_shards(folder: Path, count: int, per_shard: int, prefix: str = "photos", **kwargs) -> str:
    """Write `count` photo samples; returns the brace spec of the shards."""
    entries = write_shards(photo_samples(count, **kwargs), folder, prefix=prefix, samples_per_shard=per_shard)
    return f"{folder}/{prefix}-{{000000..{len(entries) - 1:06d}}}.tar"
