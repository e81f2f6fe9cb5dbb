"""The thumbnail descriptor: unit norm, invariant to a per-channel gain and offset, blank images apart."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sd3train.curation.descriptors import DEFAULT_THRESHOLDS, ThumbnailDescriptor
from tests.support.dedup_shards import distinct_image


def test_thumbnails_are_unit_and_ignore_a_per_channel_gain_and_offset():
    descriptor = ThumbnailDescriptor()
    image = distinct_image(np.random.default_rng(0))
    vector = descriptor.prepare(image)
    assert vector.shape == (768,) and vector.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-6)
    pixels = np.asarray(image, dtype=np.float32) * 0.5 + np.array([60.0, 10.0, 30.0])  # stays within 0..255
    shifted = descriptor.prepare(Image.fromarray(np.round(pixels).astype(np.uint8)))
    assert float(vector @ shifted) > 0.995  # equal but for rounding to uint8
    smaller = descriptor.prepare(image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC))
    assert float(vector @ smaller) > 0.97
    other = descriptor.prepare(distinct_image(np.random.default_rng(1)))
    assert float(vector @ other) < DEFAULT_THRESHOLDS["thumbnail"]


def test_blank_images_match_each_other_and_nothing_else():
    descriptor = ThumbnailDescriptor()
    grey, red = (descriptor.prepare(Image.new("RGB", (40, 30), colour)) for colour in ((128, 128, 128), (200, 0, 0)))
    np.testing.assert_allclose(grey, np.full(768, 1 / np.sqrt(768)), rtol=1e-6)
    assert float(grey @ red) > 0.999
    assert abs(float(grey @ descriptor.prepare(distinct_image(np.random.default_rng(2))))) < 1e-5
