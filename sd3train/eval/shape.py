"""Shape adherence: does a generated shapes image show the prompted shape?

The shape is the largest connected region of the image's dominant colour (sd3train/eval/colour.py
assigns pixels to the palette). Every shape of the grammar is drawn inscribed in a circle (a disc,
or a rotated square or equilateral triangle with its corners on the circle), so the region's area
over that of the smallest circle about its centroid that holds it tells them apart whatever the
rotation: a disc fills 1, a square 2/pi = 0.64, a triangle 3 sqrt(3) / (4 pi) = 0.41. On the
generator's own 64^2 images these fill ratios measured 0.91 to 0.97, 0.60 to 0.65 and 0.38 to 0.43
(600 validation samples; tests/unit/eval/test_shape.py); the thresholds lie between.

A star (data.shapes.NEW_SHAPES, scored only when a caller names it among the candidate shapes) is
told by two things no convex shape has: its region fills well under its convex hull (solidity 0.55
to 0.60 on the generator's images, 0.57 to 0.66 after the tiny VAE, against 0.87 or more for the
three convex shapes), and the distance from the centroid to the edge, walked round the circle, has
five distinct peaks (the points; circles give 0, squares 4, triangles 3).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from sd3train.data.shapes import SHAPES, parse_caption
from sd3train.eval.colour import dominant_colour_index, palette_labels

# Fill ratio above which a region is a circle, and above which (below that) a square.
CIRCLE_FILL = 0.78
SQUARE_FILL = 0.51
# Solidity below which a region is concave enough to be a star, and the star's number of points.
STAR_SOLIDITY = 0.78
STAR_POINTS = 5
# The edge profile: 72 directions of 5 degrees; a point is a maximum over +-20 degrees that stands
# above the lowest edge within +-35 degrees by 15% of the largest radius.
PROFILE_BINS = 72
PEAK_HALF_WIDTH = 4
VALLEY_HALF_WIDTH = 7
PEAK_PROMINENCE = 0.15


def fill_ratio(region: np.ndarray) -> float:
    """Area of `region` ((H, W) bool, not empty) over the circle about its centroid that holds it."""
    ys, xs = np.nonzero(region)
    radius = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5  # to the pixel's edge
    return float(len(ys) / (np.pi * radius * radius))


def solidity(region: np.ndarray) -> float:
    """Area of `region` ((H, W) bool, not empty) over that of its convex hull (pixels as squares)."""
    ys, xs = np.nonzero(region)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1) for dy in (0, 1) for dx in (0, 1)])
    try:
        return float(len(ys) / ConvexHull(corners).volume)  # in 2-D the "volume" is the area
    except QhullError:  # all corners on one line: a sliver, nothing like a star
        return 1.0


def point_count(region: np.ndarray) -> int:
    """Number of outward points of `region`: peaks of its edge's distance from the centroid by direction."""
    ys, xs = np.nonzero(region)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    direction = (np.arctan2(dy, dx) % (2.0 * np.pi) * PROFILE_BINS / (2.0 * np.pi)).astype(int) % PROFILE_BINS
    profile = np.zeros(PROFILE_BINS)
    np.maximum.at(profile, direction, np.hypot(dy, dx))
    # Smooth over three neighbouring directions, wrapping round the circle.
    profile = np.convolve(np.concatenate([profile[-1:], profile, profile[:1]]), np.ones(3) / 3.0, "valid")
    largest = profile.max()

    def around(index: int, half_width: int) -> np.ndarray:
        return profile[np.arange(index - half_width, index + half_width + 1) % PROFILE_BINS]

    return sum(1 for index in range(PROFILE_BINS)
               if profile[index] == around(index, PEAK_HALF_WIDTH).max()
               and profile[index] > profile[index - 1]  # one count for a flat top
               and profile[index] - around(index, VALLEY_HALF_WIDTH).min() > PEAK_PROMINENCE * largest)


def is_star(region: np.ndarray) -> bool:
    return solidity(region) < STAR_SOLIDITY and point_count(region) == STAR_POINTS


def dominant_shape(image: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """The shape drawn in `image` (H, W, 3 uint8) among `shapes` (the three convex ones, and "star"
    when named), or None when no shape colour dominates."""
    labels = palette_labels(image)
    colour = dominant_colour_index(labels)
    if colour is None:
        return None
    pixels = labels == colour
    regions, count = ndimage.label(pixels)
    sizes = ndimage.sum(pixels, regions, range(1, count + 1))
    region = regions == 1 + int(np.argmax(sizes))
    if "star" in shapes and is_star(region):
        return "star"
    fill = fill_ratio(region)
    return "circle" if fill > CIRCLE_FILL else "square" if fill > SQUARE_FILL else "triangle"


def shape_adherence(images: list[np.ndarray], captions: list[str], shapes: tuple[str, ...] = SHAPES) -> float:
    """Fraction of images whose dominant shape among `shapes` is the one their caption asks for."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("shape_adherence needs at least one image")
    hits = sum(dominant_shape(image, shapes) == parse_caption(caption).shape
               for image, caption in zip(images, captions))
    return hits / len(images)

