"""Aspect-ratio buckets: every batch has one image shape, close to a target area.

    buckets = make_buckets(512 * 512, step=16, max_aspect=2.0)   # [Bucket(height=352, width=736), ...]
    bucket = nearest_bucket(buckets, width=1600, height=900)
    crop, (top, left) = cover_crop(image, bucket, offset=(0.5, 0.5))

An image goes to the bucket whose aspect ratio is nearest in log space, is scaled (bicubic) so
it covers the bucket, and is cropped to it. With a single square bucket this is exactly "shorter
side to R, then the centre crop".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from PIL import Image

AREA_TOLERANCE = 0.10  # a bucket's area stays within 10% of the target


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def square_bucket(side: int) -> list[Bucket]:
    if side <= 0:
        raise ValueError(f"resolution must be positive, got {side}")
    return [Bucket(side, side)]


def make_buckets(area: int, step: int = 16, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets with sides multiple of `step`, long/short <= `max_aspect`, area within 10% of `area`.

    For each width, the height is the multiple of `step` that brings the area closest to the
    target; shapes outside the tolerance are left out. Sorted by aspect ratio (tall to wide).
    """
    if area <= 0 or step <= 0:
        raise ValueError(f"area and step must be positive, got area={area}, step={step}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    side = math.sqrt(area)
    buckets = set()
    width = step
    while width <= side * math.sqrt(max_aspect) + step:
        height = max(step, round(area / width / step) * step)
        aspect = width / height
        if 1.0 / max_aspect <= aspect <= max_aspect and abs(width * height - area) <= AREA_TOLERANCE * area:
            buckets.add(Bucket(height, width))
        width += step
    if not buckets:
        raise ValueError(f"no bucket with sides multiple of {step} has an area within 10% of {area}")
    return sorted(buckets, key=lambda bucket: (bucket.aspect, bucket.width))


def nearest_bucket(buckets: list[Bucket], width: int, height: int) -> Bucket:
    """The bucket whose aspect ratio is nearest to width/height in log space (first one on ties)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket.aspect) - target))


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) after scaling the image to cover the bucket, keeping its aspect ratio."""
    scale = max(bucket.width / width, bucket.height / height)
    # max(...) keeps each side at least the bucket's when rounding would push it below.
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def cover_crop(
    image: Image.Image, bucket: Bucket, offset: Optional[tuple[float, float]] = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover `bucket` and crop it; returns the crop and its (top, left) in the scaled image.

    `offset` (u, v) in [0, 1) places the crop: top = floor(u * (slack_h + 1)), likewise left;
    None is the centre crop.
    """
    width, height = image.size
    new_width, new_height = cover_size(width, height, bucket)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
    slack_h, slack_w = new_height - bucket.height, new_width - bucket.width
    if offset is None:
        top, left = slack_h // 2, slack_w // 2
    else:
        top = min(slack_h, int(offset[0] * (slack_h + 1)))
        left = min(slack_w, int(offset[1] * (slack_w + 1)))
    if (slack_h, slack_w) != (0, 0):
        image = image.crop((left, top, left + bucket.width, top + bucket.height))
    return image, (top, left)
