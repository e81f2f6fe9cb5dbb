"""plot_eval reads a run's metrics.csv the way Lightning writes it and draws every series."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from sd3train.tools.plot_eval import main, read_series


def write_metrics(path, rows):
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_series_are_read_at_the_optimizer_step_and_plotted(tmp_path):
    rows = [{"step": 9, "train/loss": 1.0}]
    for step, score in ((500, 0.2), (1000, 0.6)):
        rows += [{"step": step - 1, "val/loss": 1.0 / step},
                 {"step": step - 1, "eval/compositional/colours": score, "eval/compositional/overall": score / 2}]
    write_metrics(tmp_path / "metrics.csv", rows)
    series = read_series(tmp_path / "metrics.csv")
    assert series["eval/compositional/colours"] == [(500, 0.2), (1000, 0.6)]
    assert series["val/loss"] == [(500, 1 / 500), (1000, 1 / 1000)]
    assert "train/loss" not in series
    assert main([str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_a_run_without_metrics_fails_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_series(tmp_path / "metrics.csv")
