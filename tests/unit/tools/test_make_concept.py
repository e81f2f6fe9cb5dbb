"""make_concept writes an image folder of a new shape that data=folder reads and the evaluation
recognises: every image a star of its caption's colour, the same bytes on every run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd3train.data.folder import folder_images
from sd3train.data.shapes import NEW_SHAPES, SHAPES, parse_caption
from sd3train.eval.colour import dominant_colour
from sd3train.eval.shape import dominant_shape
from sd3train.tools.make_concept import main, write_concept_folder


def test_the_folder_holds_captioned_stars(tmp_path):
    assert main(["--out", str(tmp_path / "star"), "--count", "24"]) == 0
    images = folder_images(tmp_path / "star")
    assert [path.as_posix() for path in images] == [f"star-{index:05d}.png" for index in range(24)]
    captions = [(tmp_path / "star" / path).with_suffix(".txt").read_text() for path in images]
    specs = [parse_caption(caption) for caption in captions]
    assert {spec.shape for spec in specs} == {"star"} and len({(s.colour, s.background) for s in specs}) >= 8
    for path, spec in zip(images, specs):
        pixels = np.asarray(Image.open(tmp_path / "star" / path).convert("RGB"))
        assert dominant_shape(pixels, SHAPES + NEW_SHAPES) == "star"
        assert dominant_colour(pixels) == spec.colour


def test_it_is_deterministic_and_refuses_grammar_shapes(tmp_path):
    first = write_concept_folder(tmp_path / "a", count=3)
    second = write_concept_folder(tmp_path / "b", count=3)
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]
    with pytest.raises(ValueError, match="--shape: 'circle' is not one of the new shapes"):
        write_concept_folder(tmp_path / "c", shape="circle")
