"""The metric suite's plan (prompts, seeds) and the split of its sampling over ranks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sd3train.config.eval_schema import EvalConfig
from sd3train.data.scenes import CATEGORIES, parse_scene_caption, render_scene
from sd3train.eval.suite import (COMPOSITIONAL_SEED_OFFSET, QUALITY_SEED_OFFSET, MetricSuite, category_names,
                                 suite_plan)
from sd3train.inference import rank_chunks


def test_the_plan_lists_the_benchmark_then_the_quality_prompts_with_disjoint_seeds():
    cfg = EvalConfig(suite=["clip_score", "compositional"], prompts=["a red circle on a white background", "x"],
                     num_images=5, prompts_per_category=3, seed=7)
    plan = suite_plan(cfg)
    assert plan.compositional == 3 * len(CATEGORIES)
    assert [parse_scene_caption(p).category for p in plan.prompts[:plan.compositional]] == [
        category for category in CATEGORIES for _ in range(3)]
    assert plan.prompts[plan.compositional:] == ["a red circle on a white background", "x"] * 2 + [
        "a red circle on a white background"]  # eval.prompts cycled to num_images
    assert plan.seeds[:plan.compositional] == [7 + COMPOSITIONAL_SEED_OFFSET + i for i in range(plan.compositional)]
    assert plan.seeds[plan.compositional:] == [7 + QUALITY_SEED_OFFSET + i for i in range(5)]
    assert suite_plan(cfg) == plan  # every rank computes the same plan


def test_a_suite_without_quality_metrics_samples_only_the_benchmark():
    plan = suite_plan(EvalConfig(suite=["compositional"], prompts_per_category=2))
    assert plan.compositional == len(plan.prompts) == 2 * len(CATEGORIES)


@pytest.mark.parametrize("count, batch_size", [(18, 4), (5, 8), (12, 3)])
def test_rank_chunks_give_each_prompt_to_exactly_one_rank_in_fixed_batches(count, batch_size):
    single = rank_chunks(count, batch_size, 0, 1)
    for world_size in (1, 2, 3, 4):
        shares = [rank_chunks(count, batch_size, rank, world_size) for rank in range(world_size)]
        assert sorted((chunk for share in shares for chunk in share), key=lambda chunk: chunk.start) == single
    assert sorted(index for chunk in single for index in chunk) == list(range(count))


def test_the_benchmark_scores_the_real_renders_of_its_own_prompts_perfectly():
    cfg = EvalConfig(suite=["compositional"], prompts_per_category=4)
    plan = suite_plan(cfg)
    images = [np.asarray(render_scene(parse_scene_caption(prompt), 64, random.Random(index)))
              for index, prompt in enumerate(plan.prompts)]
    metrics = MetricSuite(cfg).measure(images, plan)
    assert list(metrics) == category_names()
    assert set(metrics.values()) == {1.0}
    shuffled = MetricSuite(cfg).measure(images[1:] + images[:1], plan)  # each image under its neighbour's prompt
    assert shuffled["eval/compositional/overall"] < 0.5
