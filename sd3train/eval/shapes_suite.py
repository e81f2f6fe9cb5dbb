"""The shapes world's end-of-run evaluation: which prompts are sampled, and what is scored.

    prompts = evaluation_prompts(3, new_shapes=("star",))    # the 36 grammar captions x 3, then the 12 stars x 3
    metrics = adherence_metrics(images, prompts, new_shapes=("star",))
    # {"eval/colour_adherence": ..., "eval/shape_adherence": ..., "eval/concept/star": ...,
    #  "eval/concept/star_colour": ...}

The grammar's captions give eval/colour_adherence and eval/shape_adherence; each new shape (a
concept a finetune taught, data.shapes.NEW_SHAPES) gives eval/concept/<shape>, the share of its
captions' images that show it, and eval/concept/<shape>_colour. With new shapes named, every image
is classified among all the candidate shapes, so a base prompt answered with the new shape counts
as a miss (forgetting shows in eval/shape_adherence).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sd3train.data.shapes import NEW_SHAPES, SHAPES, all_specs, parse_caption
from sd3train.eval.colour import colour_adherence
from sd3train.eval.shape import shape_adherence


def check_new_shapes(new_shapes: Sequence[str]) -> tuple[str, ...]:
    unknown = [shape for shape in new_shapes if shape not in NEW_SHAPES]
    if unknown:
        raise ValueError(f"eval.new_shapes: {unknown} are not among the new shapes {list(NEW_SHAPES)}")
    return tuple(new_shapes)


def evaluation_prompts(samples_per_caption: int, new_shapes: Sequence[str] = ()) -> list[str]:
    """Every caption of the shapes grammar, then every caption of each new shape, `samples_per_caption`
    times each."""
    specs = all_specs() + [spec for shape in check_new_shapes(new_shapes) for spec in all_specs((shape,))]
    return [spec.caption for spec in specs for _ in range(samples_per_caption)]


def adherence_metrics(images: Sequence[np.ndarray], prompts: Sequence[str],
                      new_shapes: Sequence[str] = ()) -> dict[str, float]:
    """The evaluation's numbers for `images` drawn from `prompts` (as `evaluation_prompts` lists them)."""
    candidates = SHAPES + check_new_shapes(new_shapes)
    groups: dict[str, tuple[list, list]] = {}
    for image, prompt in zip(images, prompts, strict=True):
        shape = parse_caption(prompt).shape
        group = groups.setdefault("base" if shape in SHAPES else shape, ([], []))
        group[0].append(image)
        group[1].append(prompt)
    metrics = {}
    if "base" in groups:
        base_images, base_prompts = groups.pop("base")
        metrics["eval/colour_adherence"] = colour_adherence(base_images, base_prompts)
        metrics["eval/shape_adherence"] = shape_adherence(base_images, base_prompts, candidates)
    for shape, (concept_images, concept_prompts) in groups.items():
        metrics[f"eval/concept/{shape}"] = shape_adherence(concept_images, concept_prompts, candidates)
        metrics[f"eval/concept/{shape}_colour"] = colour_adherence(concept_images, concept_prompts)
    return metrics
