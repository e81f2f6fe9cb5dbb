"""The colour-adherence measure on hand-made images."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sd3train.data.shapes import BACKGROUND_COLOURS, SHAPE_COLOURS, ShapeSpec, render
from sd3train.eval.colour import colour_adherence, dominant_colour


def painted(background: str, patches: dict[str, int], size: int = 32) -> np.ndarray:
    """A background with `patches[colour]` pixels of each shape colour, painted row by row."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_COLOURS[background]
    flat = image.reshape(-1, 3)  # (size*size, 3) view
    start = 0
    for colour, count in patches.items():
        flat[start:start + count] = SHAPE_COLOURS[colour]
        start += count
    return image


@pytest.mark.parametrize("colour", list(SHAPE_COLOURS))
@pytest.mark.parametrize("background", list(BACKGROUND_COLOURS))
def test_rendered_shape_has_its_colour(colour, background):
    image = np.asarray(render(ShapeSpec(colour, "triangle", background), 64, random.Random(3)))
    assert dominant_colour(image) == colour


def test_majority_colour_wins_over_background_and_minority():
    image = painted("white", {"blue": 60, "red": 100})
    assert dominant_colour(image) == "red"


def test_noisy_colours_are_still_classified():
    image = painted("black", {"green": 200}).astype(np.int16)
    noise = np.random.default_rng(0).integers(-25, 26, size=image.shape)
    assert dominant_colour(np.clip(image + noise, 0, 255).astype(np.uint8)) == "green"


def test_blank_image_has_no_dominant_colour():
    assert dominant_colour(painted("white", {})) is None
    # Grey is far from every palette colour, so it counts for nothing.
    assert dominant_colour(np.full((16, 16, 3), 128, dtype=np.uint8)) is None


def test_adherence_fraction():
    images = [painted("white", {"red": 200}), painted("black", {"blue": 200}),
              painted("white", {"yellow": 200}), painted("white", {})]
    captions = ["a red circle on a white background", "a green square on a black background",
                "a yellow triangle on a white background", "a purple circle on a white background"]
    assert colour_adherence(images, captions) == 0.5


def test_adherence_rejects_mismatched_lengths_and_bad_captions():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        colour_adherence([painted("white", {})] * 2, ["a red circle on a white background"])
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        colour_adherence([painted("white", {})], ["a photo of a cat"])
