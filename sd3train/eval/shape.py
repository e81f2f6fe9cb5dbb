"""Shape adherence: does a generated shapes image show the prompted shape?

The shape is the largest connected region of the image's dominant colour (sd3train/eval/colour.py
assigns pixels to the palette). Every shape of the grammar is drawn inscribed in a circle (a disc,
or a rotated square or equilateral triangle with its corners on the circle), so the region's area
over that of the smallest circle about its centroid that holds it tells them apart whatever the
rotation: a disc fills 1, a square 2/pi = 0.64, a triangle 3 sqrt(3) / (4 pi) = 0.41. On the
generator's own 64^2 images these fill ratios measured 0.91 to 0.97, 0.60 to 0.65 and 0.38 to 0.43
(600 validation samples; tests/unit/eval/test_shape.py); the thresholds lie between.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sd3train.data.shapes import parse_caption
from sd3train.eval.colour import dominant_colour_index, palette_labels

# Fill ratio above which a region is a circle, and above which (below that) a square.
CIRCLE_FILL = 0.78
SQUARE_FILL = 0.51


def fill_ratio(region: np.ndarray) -> float:
    """Area of `region` ((H, W) bool, not empty) over the circle about its centroid that holds it."""
    ys, xs = np.nonzero(region)
    radius = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5  # to the pixel's edge
    return float(len(ys) / (np.pi * radius * radius))


def dominant_shape(image: np.ndarray) -> str | None:
    """The shape drawn in `image` (H, W, 3 uint8), or None when no shape colour dominates."""
    labels = palette_labels(image)
    colour = dominant_colour_index(labels)
    if colour is None:
        return None
    pixels = labels == colour
    regions, count = ndimage.label(pixels)
    sizes = ndimage.sum(pixels, regions, range(1, count + 1))
    fill = fill_ratio(regions == 1 + int(np.argmax(sizes)))
    return "circle" if fill > CIRCLE_FILL else "square" if fill > SQUARE_FILL else "triangle"


def shape_adherence(images: list[np.ndarray], captions: list[str]) -> float:
    """Fraction of images whose dominant shape is the one their caption asks for."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("shape_adherence needs at least one image")
    hits = sum(dominant_shape(image) == parse_caption(caption).shape for image, caption in zip(images, captions))
    return hits / len(images)

