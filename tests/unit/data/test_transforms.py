"""Image decoding for the loader: exact pixel values after resize, crop and scaling to [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sd3train.data.transforms import (
    decode_caption,
    image_bytes_to_tensor,
    image_to_tensor,
    parse_extensions,
    resize_and_center_crop,
)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_to_tensor_maps_0_to_minus_1_and_255_to_1():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 51)
    tensor = image_to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1.0])
    assert tensor[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]


def test_center_crop_of_wide_image_keeps_only_the_middle():
    # 60x30: black 15-px bands left and right of a white 30x30 middle; shorter side is already 30.
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 15:45] = 255
    tensor = image_bytes_to_tensor(_png(Image.fromarray(pixels)), 30)
    assert tensor.shape == (3, 30, 30)
    assert torch.all(tensor == 1.0)


def test_tall_image_is_resized_on_the_shorter_side_then_cropped():
    image = resize_and_center_crop(Image.new("RGB", (50, 100), (10, 20, 30)), 20)
    assert image.size == (20, 20)
    # A flat colour survives resampling exactly.
    assert image_to_tensor(image)[:, 7, 7].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1])


def test_upscaling_and_palette_images_become_rgb_at_resolution():
    palette = Image.new("P", (8, 12))
    tensor = image_bytes_to_tensor(_png(palette), 16)
    assert tensor.shape == (3, 16, 16)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_parse_extensions_and_caption():
    assert parse_extensions("jpg; JPEG;.png;;webp") == ["jpg", "jpeg", "png", "webp"]
    with pytest.raises(ValueError):
        parse_extensions(" ; ")
    assert decode_caption(b" a red circle on a white background\n") == "a red circle on a white background"
