"""Compositional adherence on the compose world (sd3train/data/scenes.py), in the spirit of GenEval.

    metrics = compositional_scores(images, captions)   # captions from data.scenes.compositional_prompts
    # {"eval/compositional/single_object": ..., ..., "eval/compositional/overall": ...}

Reading an image (`detect_objects`): each pixel goes to the nearest colour of the shapes palette
(eval/colour.py's palette_labels); per shape colour, holes are filled and each 8-connected region
of at least MIN_AREA_FRACTION of the image is one object. Its shape is told by its fill ratio
(eval/shape.py: area over the circle about its centroid that holds it), with thresholds measured
on this world's smaller objects (CIRCLE_FILL, SQUARE_FILL below).

When a caption is satisfied (`satisfies`); the background word is not scored, objects a caption
does not name are allowed (as in GenEval), except where counting:
    single_object       an object of the shape is found (any colour)
    two_object          an object of each shape is found
    counting            exactly N objects of that colour and shape are found
    colours             an object of that shape in that colour is found
    position            both (colour, shape) objects are found, and every pairing of an object of
                        the first with one of the second holds the relation: the centroid offset
                        along the relation's axis has the right sign and is larger than the offset
                        across it (the renderer draws it at least twice as large)
    colour_attribution  both (colour, shape) objects are found
eval/compositional/overall is the mean over the categories present.

Negative control: `swapped_captions` gives each caption another caption of its category whose
content (`content_key`: what the rules score, so never merely reordered, "A left of B" being
"B right of A") differs, on the same background. On correct images a correct scorer never accepts
it. CHANCE is what a prompt-blind generator scores: an image for a uniformly random caption of the
category, scored against the caption asked; under these rules that is 1 / the number of distinct
contents (single_object 1/3, two_object 1/3, counting 1/36, colours 1/18, position 1/612,
colour_attribution 1/90). The swapped control must score at most that.

Measured with `python -m sd3train.tools.check_compose_scorer --count 300 --vae VAE` (300 images
per category at 64 px, seed 920001; the VAE columns are decode(encode(x)) of the same images;
`--count 1000 --seed 5` gives 1.000 real, 0.000 swapped). With the compose world's VAE
(data/vae_compose, downsampling 4; experiment=tiny_compose_cpu) every column is what a correct
scorer gives: 1.000 real and after the round trip, 0.000 swapped, in every category. With the
shapes world's VAE (data/vae_tiny, downsampling 8, fitted on one object per image):

    | category           | real  | VAE round trip | swapped (real) | swapped (VAE) | chance |
    | single_object      | 1.000 | 1.000          | 0.000          | 0.000         | 0.333  |
    | two_object         | 1.000 | 0.600          | 0.000          | 0.007         | 0.333  |
    | counting           | 1.000 | 1.000          | 0.000          | 0.000         | 0.028  |
    | colours            | 1.000 | 1.000          | 0.000          | 0.000         | 0.056  |
    | position           | 1.000 | 0.440          | 0.000          | 0.000         | 0.002  |
    | colour_attribution | 1.000 | 0.260          | 0.000          | 0.000         | 0.011  |

That VAE keeps one shape colour per image: in a scene of two colours one object fades into the
background or takes the other's colour (position, 600 images: 83 of 83 same-colour pairs kept
against 0.335 of 517 two-colour ones), whatever the object size, hence a VAE of this world's own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sd3train.data.scenes import CATEGORIES, ScenePrompt, all_scene_prompts, parse_scene_caption, random_prompt
from sd3train.data.shapes import SHAPE_COLOURS
from sd3train.eval.colour import palette_labels
from sd3train.eval.shape import fill_ratio

# Regions under this fraction of the image are specks, not objects: 49 px at 64^2, where the
# smallest object drawn (a triangle of circumradius 10.2 px) covers 136 px, and 72 or more after
# the tiny VAE's round trip (its colour fringes make smaller ones).
MIN_AREA_FRACTION = 0.012
# Fill ratio above which a region is a circle, and above which (below that) a square. Measured on
# this world's 64^2 images (1745 objects of counting and colours scenes, seed 11): triangles 0.38
# to 0.44, squares 0.58 to 0.66, circles 0.89 to 0.95; after the tiny VAE's round trip (corners
# rounded) 0.34 to 0.55, 0.59 to 0.77 and 0.83 to 0.94. eval/shape.py's 0.51 for the larger
# one-object images would call 100 of those 1745 rounded triangles squares.
CIRCLE_FILL = 0.80
SQUARE_FILL = 0.56
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_OPPOSITE = {"right of": "left of", "below": "above"}


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    x: float  # centroid, in pixels from the left
    y: float  # centroid, in pixels from the top
    area: int


def classify_region(region: np.ndarray) -> str:
    """The shape of `region` ((H, W) bool, not empty) by its fill ratio."""
    fill = fill_ratio(region)
    return "circle" if fill > CIRCLE_FILL else "square" if fill > SQUARE_FILL else "triangle"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects in `image` ((H, W, 3) uint8): one per connected region of a shape colour."""
    labels = palette_labels(image)
    objects = []
    for index, colour in enumerate(SHAPE_COLOURS):
        mask = ndimage.binary_fill_holes(labels == index)
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        for label in range(1, count + 1):
            region = regions == label
            area = int(region.sum())
            if area < MIN_AREA_FRACTION * labels.size:
                continue
            ys, xs = np.nonzero(region)
            objects.append(DetectedObject(colour, classify_region(region), float(xs.mean()), float(ys.mean()), area))
    return objects


def relation_holds(relation: str, subject: DetectedObject, reference: DetectedObject) -> bool:
    """Whether `subject` is `relation` `reference`: along the relation's axis, on the right side and
    further than across it (image y grows downwards)."""
    dx, dy = subject.x - reference.x, subject.y - reference.y
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > abs(across)


def satisfies_prompt(objects: Sequence[DetectedObject], prompt: ScenePrompt) -> bool:
    """Whether detected `objects` satisfy `prompt` under the rules of the module docstring."""
    def matching(wanted) -> list[DetectedObject]:
        return [obj for obj in objects if obj.shape == wanted.shape and wanted.colour in (None, obj.colour)]

    found = [matching(wanted) for wanted in prompt.objects]
    if prompt.category == "counting":
        return len(found[0]) == prompt.count
    if not all(found):
        return False
    if prompt.category == "position":
        return all(relation_holds(prompt.relation, subject, reference)
                   for subject in found[0] for reference in found[1])
    return True


def satisfies(image: np.ndarray, caption: str) -> bool:
    """Whether `image` ((H, W, 3) uint8) shows what `caption` (compose grammar) asks."""
    return satisfies_prompt(detect_objects(image), parse_scene_caption(caption))


def compositional_scores(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """eval/compositional/<category> (share of that category's images satisfying their caption) for
    every category present, and eval/compositional/overall, their mean."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("compositional_scores needs at least one image")
    hits: dict[str, list[bool]] = {}
    for image, caption in zip(images, captions):
        prompt = parse_scene_caption(caption)
        hits.setdefault(prompt.category, []).append(satisfies_prompt(detect_objects(image), prompt))
    scores = {f"eval/compositional/{category}": float(np.mean(hits[category]))
              for category in CATEGORIES if category in hits}
    scores["eval/compositional/overall"] = float(np.mean(list(scores.values())))
    return scores


def content_key(prompt: ScenePrompt) -> tuple:
    """What the rules score of `prompt`: equal keys are the same request (the background, the order
    of "A and B" and the side of a relation named aside)."""
    if prompt.category in ("two_object", "colour_attribution"):
        return prompt.category, frozenset(prompt.objects)
    if prompt.category == "position" and prompt.relation in _OPPOSITE:
        return prompt.category, prompt.objects[::-1], prompt.count, _OPPOSITE[prompt.relation]
    return prompt.category, prompt.objects, prompt.count, prompt.relation


CHANCE: dict[str, float] = {category: 1.0 / len({content_key(prompt) for prompt in all_scene_prompts(category)})
                            for category in CATEGORIES}


def swapped_captions(captions: Sequence[str], seed: int = 0) -> list[str]:
    """For each caption, a random caption of the same category and background whose content differs
    (the negative control: a correct scorer on correct images accepts none)."""
    swapped = []
    for index, caption in enumerate(captions):
        prompt = parse_scene_caption(caption)
        rng = random.Random(f"compose-swap-{seed}-{index}")
        other = random_prompt(prompt.category, rng, prompt.background)
        while content_key(other) == content_key(prompt):
            other = random_prompt(prompt.category, rng, prompt.background)
        swapped.append(other.caption)
    return swapped
