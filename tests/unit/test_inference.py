"""sd3train.inference.write_grid: images land row-major, the last row padded with black."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd3train.inference import write_grid


def test_grid_places_images_row_major_and_pads_the_last_row(tmp_path):
    images = [np.full((4, 6, 3), 10 * (index + 1), np.uint8) for index in range(5)]
    path = write_grid(tmp_path / "sub" / "grid.png", images, columns=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 4, 2 * 6, 3)
    for index in range(5):
        row, column = divmod(index, 2)
        assert (grid[row * 4:(row + 1) * 4, column * 6:(column + 1) * 6] == 10 * (index + 1)).all()
    assert (grid[8:, 6:] == 0).all()


def test_grid_refuses_no_images(tmp_path):
    with pytest.raises(ValueError, match="0 images"):
        write_grid(tmp_path / "grid.png", [], columns=3)
