"""Learning-rate multipliers against their formulas."""

from __future__ import annotations

import math

import pytest

from sd3train.runtime.lr_schedule import lr_factor


def test_warmup_is_linear_then_constant():
    assert [lr_factor(step, 4, 100) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(99, 4, 100) == 1.0
    assert lr_factor(0, 0, 100) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decays_reach_the_floor_at_the_last_step(schedule):
    assert lr_factor(10, 10, 110, schedule, 0.1) == pytest.approx(1.0)
    assert lr_factor(110, 10, 110, schedule, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, schedule, 0.1) == pytest.approx(0.1)  # past the end stays at the floor


def test_midpoints_follow_the_formulas():
    # a quarter of the way: cosine 0.5 * (1 + cos(pi / 4)), linear 0.75
    assert lr_factor(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(35, 10, 110, "linear") == pytest.approx(0.75)
    assert lr_factor(60, 10, 110, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'step'"):
        lr_factor(0, 0, 10, "step")
