"""The shapes world's evaluation: which prompts it samples and what it reports for them."""

from __future__ import annotations

import numpy as np
import pytest

from sd3train.data.shapes import NEW_SHAPES, all_specs, make_sample, parse_caption, render
from sd3train.eval.shapes_suite import adherence_metrics, evaluation_prompts


def test_the_prompts_are_the_grammar_then_each_new_shape():
    base = evaluation_prompts(2)
    assert base == [spec.caption for spec in all_specs() for _ in range(2)] and len(base) == 72
    with_star = evaluation_prompts(2, new_shapes=["star"])
    assert with_star[:72] == base
    assert [parse_caption(prompt).shape for prompt in with_star[72:]] == ["star"] * 24
    assert len(set(with_star[72:])) == 12  # every colour on every background
    with pytest.raises(ValueError, match="eval.new_shapes: \\['hexagon'\\]"):
        evaluation_prompts(1, new_shapes=["hexagon"])


def _drawn(prompts: list[str], shape_for=lambda shape: shape) -> list[np.ndarray]:
    """Each prompt rendered by the dataset's own generator, with its shape swapped by `shape_for`."""
    import random

    images = []
    for index, prompt in enumerate(prompts):
        spec = parse_caption(prompt)
        spec = type(spec)(spec.colour, shape_for(spec.shape), spec.background)
        images.append(np.asarray(render(spec, 64, random.Random(index))))
    return images


def test_real_images_score_one_and_a_swapped_concept_scores_zero():
    prompts = evaluation_prompts(1, new_shapes=NEW_SHAPES)
    metrics = adherence_metrics(_drawn(prompts), prompts, NEW_SHAPES)
    assert metrics == {"eval/colour_adherence": 1.0, "eval/shape_adherence": 1.0,
                       "eval/concept/star": 1.0, "eval/concept/star_colour": 1.0}
    # Stars drawn as circles: the concept is missed, its colours are not.
    circles = adherence_metrics(_drawn(prompts, lambda shape: "circle" if shape == "star" else shape),
                                prompts, NEW_SHAPES)
    assert circles["eval/concept/star"] == 0.0 and circles["eval/concept/star_colour"] == 1.0
    # Forgetting: base circles drawn as stars count against the base's shape adherence.
    forgot = adherence_metrics(_drawn(prompts, lambda shape: "star" if shape == "circle" else shape),
                               prompts, NEW_SHAPES)
    assert forgot["eval/shape_adherence"] == pytest.approx(2 / 3)


def test_without_new_shapes_the_report_is_the_grammars():
    images = [np.asarray(make_sample(7, index, 64)[0]) for index in range(12)]
    prompts = [make_sample(7, index, 64)[1] for index in range(12)]
    assert set(adherence_metrics(images, prompts)) == {"eval/colour_adherence", "eval/shape_adherence"}
