"""Procedural "coloured shapes" dataset: the embedded default's training data.

Every sample is a pure function of (seed, index), so the shards written by
`python -m sd3train.tools.make_shapes` are identical on every machine.

Caption grammar: "a|an {colour} {shape} on a {background} background".

NEW_SHAPES are drawn and captioned the same way but never appear in the training shards: the
concepts a finetune teaches (experiment=lora_tiny_cpu, `python -m sd3train.tools.make_concept`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# RGB of each shape colour; chosen far apart so a blurry tiny model's output is still classifiable.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 10),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NEW_SHAPES: tuple[str, ...] = ("star",)
# A five-pointed star's inner corners at this fraction of its outer radius: concave enough that
# the tiny VAE's reconstructions stay unmistakably stars (sd3train/eval/shape.py).
STAR_INNER_RADIUS = 0.45


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} on a {self.background} background"


def all_specs(shapes: tuple[str, ...] = SHAPES) -> list[ShapeSpec]:
    """Every caption the grammar can produce with `shapes`, in a fixed order."""
    return [
        ShapeSpec(colour, shape, background)
        for colour in SHAPE_COLOURS
        for shape in shapes
        for background in BACKGROUND_COLOURS
    ]


def parse_caption(caption: str, shapes: tuple[str, ...] = SHAPES + NEW_SHAPES) -> ShapeSpec:
    """Inverse of `ShapeSpec.caption`; raises ValueError naming the caption if it is not in the grammar
    (with `shapes` as its shape words)."""
    words = caption.split()
    if len(words) != 7 or words[0] not in ("a", "an") or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"caption {caption!r} is not in the shapes grammar")
    spec = ShapeSpec(colour=words[1], shape=words[2], background=words[5])
    if spec.colour not in SHAPE_COLOURS or spec.shape not in shapes or spec.background not in BACKGROUND_COLOURS:
        raise ValueError(f"caption {caption!r} names an unknown colour, shape or background")
    return spec


def render(spec: ShapeSpec, size: int, rng: random.Random) -> Image.Image:
    """Draw one shape of random size, position and rotation on a plain background."""
    image = Image.new("RGB", (size, size), BACKGROUND_COLOURS[spec.background])
    draw = ImageDraw.Draw(image)
    colour = SHAPE_COLOURS[spec.colour]
    radius = rng.uniform(0.22, 0.38) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    if spec.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        return image
    angle0 = rng.uniform(0.0, 2.0 * math.pi)
    if spec.shape == "star":  # ten corners, alternately on the outer and the inner circle
        radii = [radius if i % 2 == 0 else STAR_INNER_RADIUS * radius for i in range(10)]
    else:
        radii = [radius] * (4 if spec.shape == "square" else 3)
    points = [
        (cx + r * math.cos(angle0 + 2.0 * math.pi * i / len(radii)),
         cy + r * math.sin(angle0 + 2.0 * math.pi * i / len(radii)))
        for i, r in enumerate(radii)
    ]
    draw.polygon(points, fill=colour)
    return image


def render_concept(spec: ShapeSpec, size: int, rng: random.Random) -> Image.Image:
    """Draw a new shape as a finetune's concept: one object seen the same way in every image (upright,
    centred), of random size, in the colour and on the background `spec` names."""
    image = Image.new("RGB", (size, size), BACKGROUND_COLOURS[spec.background])
    radius = rng.uniform(0.30, 0.40) * size
    corners = 10 if spec.shape == "star" else 4 if spec.shape == "square" else 3
    radii = [radius if i % 2 == 0 or spec.shape != "star" else STAR_INNER_RADIUS * radius for i in range(corners)]
    points = [
        (size / 2 + r * math.cos(-math.pi / 2 + 2.0 * math.pi * i / corners),  # the first point straight up
         size / 2 + r * math.sin(-math.pi / 2 + 2.0 * math.pi * i / corners))
        for i, r in enumerate(radii)
    ]
    ImageDraw.Draw(image).polygon(points, fill=SHAPE_COLOURS[spec.colour])
    return image


def make_concept_sample(seed: int, index: int, size: int, shape: str) -> tuple[Image.Image, str]:
    """Image `index` of a concept folder of `shape`: the colours and backgrounds in turn, so a folder
    of 12k images holds each pair k times."""
    specs = all_specs((shape,))
    spec = specs[index % len(specs)]
    return render_concept(spec, size, random.Random(f"concept-{seed}-{index}")), spec.caption


def make_sample(seed: int, index: int, size: int, shapes: tuple[str, ...] = SHAPES) -> tuple[Image.Image, str]:
    """Sample `index` of the dataset with base seed `seed` and shape words `shapes`: (image, caption)."""
    rng = random.Random(f"shapes-{seed}-{index}")
    specs = all_specs(shapes)
    spec = specs[rng.randrange(len(specs))]
    return render(spec, size, rng), spec.caption


def image_to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
