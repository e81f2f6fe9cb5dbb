"""The compose world (sd3train/data/scenes.py): its caption grammar, the renderer's guarantees, and
its shards (make_shapes --world compose)."""

from __future__ import annotations

import random
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from sd3train.data.scenes import (
    CATEGORIES,
    RELATIONS,
    SceneObject,
    ScenePrompt,
    all_scene_prompts,
    compositional_prompts,
    make_scene_sample,
    parse_scene_caption,
    render_scene,
)
from sd3train.data.shapes import BACKGROUND_COLOURS, SHAPE_COLOURS, SHAPES, parse_caption
from sd3train.data.tar_writer import read_manifest, sha256_file
from sd3train.tools.make_shapes import build_shapes

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def test_every_prompt_of_every_category_round_trips_through_its_caption():
    sizes = {category: len(all_scene_prompts(category)) for category in CATEGORIES}
    # 2 backgrounds x: 3 shapes; 3*2 ordered shape pairs; 2 counts * 18; 18; 4 relations * 18*17; 18*10.
    assert sizes == {"single_object": 6, "two_object": 12, "counting": 72, "colours": 36, "position": 2448,
                     "colour_attribution": 360}
    for category in CATEGORIES:
        for prompt in all_scene_prompts(category):
            assert parse_scene_caption(prompt.caption) == prompt
            assert prompt.category == category


def test_captions_read_as_written():
    assert parse_scene_caption("an orange triangle above a red circle on a black background") == ScenePrompt(
        "position", (SceneObject("triangle", "orange"), SceneObject("circle", "red")), "black", relation="above")
    assert parse_scene_caption("three yellow squares on a white background") == ScenePrompt(
        "counting", (SceneObject("square", "yellow"),), "white", count=3)
    assert parse_scene_caption("a circle and a triangle on a white background").category == "two_object"
    # The colours category is exactly the shapes world's grammar.
    caption = "an orange square on a black background"
    assert parse_scene_caption(caption).category == "colours" and parse_caption(caption).colour == "orange"


@pytest.mark.parametrize("caption", [
    "a red circle",                                            # no background
    "an red circle on a white background",                     # wrong article
    "a orange circle on a white background",
    "a red  circle on a white background",                     # doubled space
    "a red star on a white background",                        # not a shape of the world
    "a circle on a grey background",
    "a circle and a circle on a white background",             # two_object needs two shapes
    "a red circle and a red square on a white background",     # colour_attribution needs two colours
    "a red circle and a blue circle on a white background",    # ... and two shapes
    "a red circle and a square on a white background",         # one coloured, one not
    "a red circle left of a red circle on a white background",
    "a circle left of a square on a white background",         # position names colours
    "four red circles on a white background",
    "two red circle on a white background",
    "two circles on a white background",
    "a red circle on a white background background",
    "",
])
def test_a_caption_outside_the_grammar_raises_naming_it(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        parse_scene_caption(caption)


def test_make_scene_sample_is_a_pure_function_of_seed_and_index():
    first, again = make_scene_sample(3, 17, 64), make_scene_sample(3, 17, 64)
    assert first[1] == again[1] and first[0].tobytes() == again[0].tobytes()
    others = [make_scene_sample(3, 18, 64), make_scene_sample(4, 17, 64)]
    assert all(other[0].tobytes() != first[0].tobytes() for other in others)


def test_categories_are_mixed_evenly():
    counts = Counter(parse_scene_caption(make_scene_sample(0, index, 16)[1]).category for index in range(600))
    # 100 expected each; a binomial's standard deviation is 9.1.
    assert set(counts) == set(CATEGORIES) and all(70 <= count <= 130 for count in counts.values())


def _objects(image: np.ndarray, background: str) -> tuple[np.ndarray, int]:
    """Labels and count of the 8-connected regions not of the background colour."""
    return ndimage.label((image != BACKGROUND_COLOURS[background]).any(axis=-1), structure=EIGHT_CONNECTED)


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_object_is_its_own_region_with_a_gap(category):
    for index in range(40):
        image, caption = make_scene_sample(5, index, 64, category)
        prompt = parse_scene_caption(caption)
        labels, count = _objects(np.asarray(image), prompt.background)
        assert count == len(prompt.objects) * prompt.count, caption
        # Pixel centres of two objects at least 3 px apart (measured: 3.6 px at least over 1500 samples),
        # so two background pixels lie between them in any direction.
        for label in range(1, count):
            distance = ndimage.distance_transform_edt(labels != label)
            assert distance[labels > label].min() >= 3.0, caption


@pytest.mark.parametrize("relation", RELATIONS)
def test_position_relations_are_drawn_clearly(relation):
    """The subject's centre is on the named side, at least 1.5x further along the axis than across it."""
    subject, reference = SceneObject("triangle", "red"), SceneObject("square", "blue")
    for seed in range(30):
        prompt = ScenePrompt("position", (subject, reference), "white", relation=relation)
        pixels = np.asarray(render_scene(prompt, 64, random.Random(seed)))
        (sy, sx), (ry, rx) = (np.argwhere((pixels == SHAPE_COLOURS[obj.colour]).all(axis=-1)).mean(axis=0)
                              for obj in (subject, reference))
        dx, dy = sx - rx, sy - ry
        along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
        assert along > 1.5 * abs(across), (relation, seed, dx, dy)


def test_open_colours_are_drawn_at_random():
    colours = set()
    for seed in range(40):
        prompt = ScenePrompt("two_object", (SceneObject("circle"), SceneObject("square")), "black")
        pixels = np.asarray(render_scene(prompt, 32, random.Random(seed))).reshape(-1, 3)
        colours |= {name for name, rgb in SHAPE_COLOURS.items() if (pixels == rgb).all(axis=-1).any()}
    assert colours == set(SHAPE_COLOURS)


def test_compositional_prompts_cover_every_category_and_word_and_are_deterministic():
    prompts = compositional_prompts(4)
    assert prompts == compositional_prompts(4) and prompts != compositional_prompts(4, seed=1)
    parsed = [parse_scene_caption(caption) for caption in prompts]
    assert [prompt.category for prompt in parsed] == [category for category in CATEGORIES for _ in range(4)]
    for category in CATEGORIES:
        ours = [prompt for prompt in parsed if prompt.category == category]
        assert len(set(ours)) == 4
        assert {prompt.background for prompt in ours} == set(BACKGROUND_COLOURS)
        assert {obj.shape for prompt in ours for obj in prompt.objects} == set(SHAPES)
    assert {prompt.relation for prompt in parsed if prompt.category == "position"} == set(RELATIONS)
    assert {prompt.count for prompt in parsed if prompt.category == "counting"} == {2, 3}
    assert {obj.colour for prompt in parsed for obj in prompt.objects if prompt.category == "colour_attribution"} \
        == set(SHAPE_COLOURS)
    # More prompts than a category has: every one of them, then again.
    singles = [caption for caption in compositional_prompts(12) if parse_scene_caption(caption).category
               == "single_object"]
    assert Counter(Counter(singles).values()) == {2: 6}


def test_make_shapes_writes_the_compose_world(tmp_path):
    arguments = dict(train=12, val=4, size=32, samples_per_shard=8, world="compose")
    assert build_shapes(tmp_path / "a", **arguments) and build_shapes(tmp_path / "b", **arguments)
    manifest = read_manifest(tmp_path / "a")
    assert {split: source["generator"] for split, source in manifest["sources"].items()} == {
        "train": "sd3train.data.scenes", "val": "sd3train.data.scenes"}
    assert [entry["name"] for entry in manifest["shards"]] == ["train-000000.tar", "train-000001.tar",
                                                               "val-000000.tar"]
    for entry in manifest["shards"]:  # byte-identical rebuilds
        assert sha256_file(tmp_path / "b" / entry["name"]) == entry["sha256"]
    with tarfile.open(tmp_path / "a" / "val-000000.tar") as archive:
        captions = [archive.extractfile(member).read().decode() for member in archive.getmembers()
                    if member.name.endswith(".txt")]
    assert captions == [make_scene_sample(1_000_000, index, 32)[1] for index in range(4)]
    assert not build_shapes(tmp_path / "a", **arguments)  # up to date
    # The same arguments in the other world rebuild.
    assert build_shapes(tmp_path / "a", **{**arguments, "world": "shapes"})
    assert read_manifest(tmp_path / "a")["sources"]["train"]["generator"] == "sd3train.data.shapes"
    with pytest.raises(ValueError, match="unknown world"):
        build_shapes(tmp_path / "c", **{**arguments, "world": "galaxies"})


def test_make_shapes_can_draw_some_categories_only(tmp_path):
    # --categories: a training mix weighted toward some categories (e.g. one-object scenes).
    arguments = dict(train=40, val=4, size=32, samples_per_shard=20, world="compose", categories=("single_object",))
    assert build_shapes(tmp_path / "a", **arguments)
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as archive:
        captions = [archive.extractfile(member).read().decode() for member in archive.getmembers()
                    if member.name.endswith(".txt")]
    assert {parse_scene_caption(caption).category for caption in captions} == {"single_object"}
    assert read_manifest(tmp_path / "a")["sources"]["train"]["categories"] == ["single_object"]
    assert not build_shapes(tmp_path / "a", **arguments)  # up to date
    assert build_shapes(tmp_path / "a", **{**arguments, "categories": ()})  # all six: a rebuild
    assert "categories" not in read_manifest(tmp_path / "a")["sources"]["train"]
    with pytest.raises(ValueError, match="compose world only"):
        build_shapes(tmp_path / "b", **{**arguments, "world": "shapes"})
    with pytest.raises(ValueError, match="unknown categories"):
        make_scene_sample(0, 0, 32, categories=("selfies",))
