"""Aspect buckets: sides multiple of the step, area within 10% of the target, nearest by log aspect."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from sd3train.data.buckets import Bucket, cover_crop, make_buckets, nearest_bucket


@pytest.mark.parametrize("side", [256, 512, 1024])
def test_buckets_have_step_multiple_sides_and_area_within_ten_percent(side):
    buckets = make_buckets(side * side, step=16, max_aspect=2.0)
    assert Bucket(side, side) in buckets
    assert len(buckets) >= 5
    for bucket in buckets:
        assert bucket.height % 16 == 0 and bucket.width % 16 == 0
        assert abs(bucket.height * bucket.width - side * side) <= 0.1 * side * side
        assert 0.5 <= bucket.aspect <= 2.0
    aspects = [bucket.aspect for bucket in buckets]
    assert aspects == sorted(aspects) and aspects[0] < 0.6 and aspects[-1] > 1.7


def test_nearest_bucket_is_nearest_in_log_aspect():
    buckets = make_buckets(512 * 512)
    for width, height in [(1920, 1080), (1080, 1920), (1000, 1000), (4000, 1000)]:
        chosen = nearest_bucket(buckets, width, height)
        distance = abs(math.log(chosen.aspect) - math.log(width / height))
        assert all(distance <= abs(math.log(b.aspect) - math.log(width / height)) + 1e-12 for b in buckets)
    assert nearest_bucket(buckets, 1000, 1000) == Bucket(512, 512)
    assert nearest_bucket(buckets, 4000, 1000).aspect == max(b.aspect for b in buckets)


def test_cover_crop_covers_the_bucket_and_places_the_crop():
    bucket = Bucket(height=32, width=64)
    image = Image.new("RGB", (100, 100))
    centre, (top, left) = cover_crop(image, bucket)
    assert centre.size == (64, 32) and (top, left) == (16, 0)  # scaled to 64x64, 32 rows of slack
    first, offsets = cover_crop(image, bucket, offset=(0.0, 0.0))
    assert offsets == (0, 0)
    last, offsets = cover_crop(image, bucket, offset=(0.999, 0.999))
    assert offsets == (32, 0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_aspect"):
        make_buckets(1024, max_aspect=0.5)
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket([Bucket(16, 16)], 0, 10)
