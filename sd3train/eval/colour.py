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


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into the palette (shape colours, then backgrounds) of each pixel of `image`
    (H, W, 3 uint8); -1 where the pixel is too far from every palette colour to be trusted."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    pixels = image.reshape(-1, 3).astype(np.float32)  # (H*W, 3)
    distances = np.linalg.norm(pixels[:, None, :] - _PALETTE[None, :, :], axis=-1)  # (H*W, colours)
    nearest = distances.argmin(axis=1)
    trusted = distances[np.arange(len(pixels)), nearest] <= MAX_DISTANCE
    return np.where(trusted, nearest, -1).reshape(image.shape[:2])


def dominant_colour_index(labels: np.ndarray) -> int | None:
    """The palette index of the most frequent shape colour in `palette_labels` output, or None when
    too few pixels are close to any shape colour."""
    counts = np.bincount(labels[labels >= 0], minlength=len(_NAMES))[: len(SHAPE_COLOURS)]
    if counts.sum() < MIN_SHAPE_FRACTION * labels.size:
        return None
    return int(counts.argmax())


def dominant_colour(image: np.ndarray) -> str | None:
    """Most frequent shape colour in `image` (H, W, 3 uint8); background colours never win.

    Returns None when too few pixels are close to any shape colour.
    """
    index = dominant_colour_index(palette_labels(image))
    return None if index is None else _NAMES[index]


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
