"""The shape-adherence measure on the generator's own images, sharp and blurred, and on hand-made ones;
the star (a shape outside the grammar) among them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFilter

from sd3train.data.shapes import BACKGROUND_COLOURS, NEW_SHAPES, SHAPE_COLOURS, SHAPES, make_sample, parse_caption
from sd3train.eval.shape import (
    STAR_POINTS,
    STAR_SOLIDITY,
    dominant_shape,
    is_star,
    point_count,
    shape_adherence,
    solidity,
)
from sd3train.tools.make_concept import CONCEPT_SEED
from sd3train.tools.make_shapes import VAL_SEED_OFFSET


def _validation_samples(count: int, size: int = 64):
    return [make_sample(VAL_SEED_OFFSET, index, size) for index in range(count)]


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_the_generators_images_are_classified(blur):
    """Every shape, colour, background, size and rotation of the grammar; a blur as a model's soft edges."""
    samples = _validation_samples(300)
    images = [np.asarray(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image) for image, _ in samples]
    captions = [caption for _, caption in samples]
    score = shape_adherence(images, captions)
    # Sharp: all 300. Blurred with radius 1.5: measured 298 of 300 (a radius of 2 gives 272).
    assert score == 1.0 if not blur else score >= 0.98
    assert {parse_caption(caption).shape for caption in captions} == {"circle", "square", "triangle"}


def test_a_blank_image_has_no_shape_and_a_wrong_shape_scores_zero():
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    blank[:] = BACKGROUND_COLOURS["white"]
    assert dominant_shape(blank) is None
    image, caption = _validation_samples(1)[0]
    spec = parse_caption(caption)
    other = next(shape for shape in ("circle", "square", "triangle") if shape != spec.shape)
    wrong = caption.replace(spec.shape, other)
    assert shape_adherence([np.asarray(image)] * 2, [caption, wrong]) == 0.5


def test_the_largest_region_of_the_dominant_colour_decides():
    """A few specks of the same colour elsewhere do not change a square into something else."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = BACKGROUND_COLOURS["black"]
    image[20:44, 20:44] = SHAPE_COLOURS["red"]  # an axis-aligned square
    image[2, 2] = image[60, 3] = image[5, 58] = SHAPE_COLOURS["red"]
    assert dominant_shape(image) == "square"


def test_adherence_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        shape_adherence([np.zeros((8, 8, 3), dtype=np.uint8)], ["a", "b"])
    with pytest.raises(ValueError, match="at least one image"):
        shape_adherence([], [])


def _stars(count: int, size: int = 64):
    return [make_sample(CONCEPT_SEED, index, size, shapes=("star",)) for index in range(count)]


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_stars_are_told_from_the_convex_shapes(blur):
    """With "star" among the candidates every generated star is one, sharp or soft, and none of the
    grammar's convex shapes is taken for one; without it the old three-way answer stands."""
    def soft(image):
        return np.asarray(image.filter(ImageFilter.GaussianBlur(blur)) if blur else image)

    candidates = SHAPES + NEW_SHAPES
    stars = [soft(image) for image, _ in _stars(120)]
    # Measured: 120 of 120 sharp and blurred (radius 1).
    assert [dominant_shape(image, candidates) for image in stars] == ["star"] * 120
    samples = _validation_samples(300)
    convex = [soft(image) for image, _ in samples]
    captions = [caption for _, caption in samples]
    assert shape_adherence(convex, captions, candidates) == shape_adherence(convex, captions)
    assert all(dominant_shape(image) != "star" for image in stars)  # not a candidate: never the answer


def test_the_star_test_reads_concavity_and_points():
    region = np.zeros((64, 64), dtype=bool)
    region[16:48, 16:48] = True  # a square: convex, 4 points
    assert solidity(region) > 0.95 and point_count(region) == 4
    star = np.asarray(_stars(1)[0][0])
    labels = (np.abs(star.astype(int) - star[0, 0].astype(int)).sum(-1) > 60)  # not the background
    assert solidity(labels) < STAR_SOLIDITY and point_count(labels) == STAR_POINTS
    plus = np.zeros((64, 64), dtype=bool)
    plus[28:36, 12:52] = plus[12:52, 28:36] = True  # concave, but its arms' 8 corners are no star's points
    assert solidity(plus) < STAR_SOLIDITY and point_count(plus) == 8 and not is_star(plus)
    assert is_star(labels) and not is_star(region)
