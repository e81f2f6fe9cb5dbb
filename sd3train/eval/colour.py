"""Colour adherence: does a generated shapes image show the prompted colour?

Each pixel is assigned to the nearest colour of the shapes palette (shape colours and
background colours together). Pixels nearest a background colour, and pixels too far
from every palette colour to be trusted, are ignored; the most frequent remaining shape
colour is the image's dominant colour.
"""

from __future__ import annotations

import numpy as np

from sd3train.data.shapes import BACKGROUND_COLOURS, SHAPE_COLOURS, parse_caption

# Pixels further than this (Euclidean, 0-255 RGB) from every palette colour count for nothing.
MAX_DISTANCE = 90.0
# Fewer than this fraction of the image's pixels in shape colours means "no shape drawn".
MIN_SHAPE_FRACTION = 0.01

_NAMES = list(SHAPE_COLOURS) + [f"background:{name}" for name in BACKGROUND_COLOURS]
_PALETTE = np.array(list(SHAPE_COLOURS.values()) + list(BACKGROUND_COLOURS.values()), dtype=np.float32)


def dominant_colour(image: np.ndarray) -> str | None:
    """Most frequent shape colour in `image` (H, W, 3 uint8); background colours never win.

    Returns None when too few pixels are close to any shape colour.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    pixels = image.reshape(-1, 3).astype(np.float32)  # (H*W, 3)
    distances = np.linalg.norm(pixels[:, None, :] - _PALETTE[None, :, :], axis=-1)  # (H*W, colours)
    nearest = distances.argmin(axis=1)
    trusted = distances[np.arange(len(pixels)), nearest] <= MAX_DISTANCE
    counts = np.bincount(nearest[trusted], minlength=len(_NAMES))[: len(SHAPE_COLOURS)]
    if counts.sum() < MIN_SHAPE_FRACTION * len(pixels):
        return None
    return _NAMES[int(counts.argmax())]


def colour_adherence(images: list[np.ndarray], captions: list[str]) -> float:
    """Fraction of images whose dominant shape colour is the one their caption asks for."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("colour_adherence needs at least one image")
    hits = 0
    for image, caption in zip(images, captions):
        spec = parse_caption(caption)
        hits += dominant_colour(image) == spec.colour
    return hits / len(images)
