"""Sample decoding: exact pixels after cover-resize and crop, skip reasons, caption choice, probe = decode."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd3train.data.buckets import Bucket, make_buckets, square_bucket
from sd3train.data.captions import CaptionField, decode_text
from sd3train.data.decoders import Decoded, ImageDecoder, Skip, image_to_tensor, parse_extensions
from sd3train.data.skips import DECODE_ERROR, NO_CAPTION, NO_IMAGE, TOO_SMALL
from sd3train.data.tar_reader import RawSample


def _encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _decoder(buckets=None, **overrides) -> ImageDecoder:
    fields = dict(
        buckets=tuple(buckets or square_bucket(30)),
        image_extensions=("jpg", "png"),
        caption=CaptionField.parse("txt"),
    )
    fields.update(overrides)
    return ImageDecoder(**fields)


def _raw(image_bytes: bytes | None, caption: bytes | None = b"a caption", key: str = "k", **extra) -> RawSample:
    fields = dict(extra)
    if image_bytes is not None:
        fields["png"] = image_bytes
    if caption is not None:
        fields["txt"] = caption
    return RawSample(key=key, url="shard.tar", fields=fields)


def test_image_to_tensor_maps_0_to_minus_1_and_255_to_1():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 51)
    tensor = image_to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1.0])
    assert tensor[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]


def test_centre_crop_of_wide_image_keeps_only_the_middle():
    # 60x30: black 15-px bands left and right of a white 30x30 middle; shorter side is already 30.
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 15:45] = 255
    item = _decoder().decode(_raw(_encoded(Image.fromarray(pixels))), epoch=0)
    assert item.tensors["images"].shape == (3, 30, 30) and torch.all(item.tensors["images"] == 1.0)
    assert item.tensors["original_sizes"].tolist() == [30, 60]
    assert item.tensors["crop_offsets"].tolist() == [0, 15]


def test_tall_image_is_resized_on_the_shorter_side_then_cropped_and_palette_becomes_rgb():
    item = _decoder(square_bucket(20)).decode(_raw(_encoded(Image.new("RGB", (50, 100), (10, 20, 30)))), 0)
    assert item.tensors["images"].shape == (3, 20, 20)
    # A flat colour survives resampling exactly.
    assert item.tensors["images"][:, 7, 7].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1])
    palette = _decoder(square_bucket(16)).decode(_raw(_encoded(Image.new("P", (8, 12)))), 0)
    assert palette.tensors["images"].shape == (3, 16, 16)


def test_wide_image_goes_to_a_wide_bucket_and_random_crop_and_flip_depend_on_key_and_epoch():
    buckets = make_buckets(64 * 64, step=16, max_aspect=2.0)
    pixels = np.random.default_rng(0).integers(0, 255, (60, 150, 3), dtype=np.uint8)
    raw = _raw(_encoded(Image.fromarray(pixels)))
    decoder = _decoder(buckets, random_crop=True, random_flip=True)
    items = [decoder.decode(raw, epoch) for epoch in range(8)]
    assert {item.bucket for item in items} == {max(buckets, key=lambda bucket: bucket.aspect)}
    assert {tuple(item.tensors["crop_offsets"].tolist()) for item in items} != {tuple(items[0].tensors["crop_offsets"].tolist())}
    assert {item.values["flipped"] for item in items} == {True, False}
    again = decoder.decode(raw, 3)
    assert torch.equal(again.tensors["images"], items[3].tensors["images"])


@pytest.mark.parametrize(
    "raw, reason",
    [
        (_raw(None), NO_IMAGE),
        (_raw(_encoded(Image.new("RGB", (40, 40))), caption=None), NO_CAPTION),
        (_raw(_encoded(Image.new("RGB", (40, 40))), caption=b"  \n"), NO_CAPTION),
        (_raw(b"not an image at all"), DECODE_ERROR),
        (_raw(_encoded(Image.new("RGB", (40, 20)))), TOO_SMALL),
    ],
)
def test_bad_samples_give_their_skip_reason(raw, reason):
    result = _decoder(min_size=30).decode(raw, 0)
    assert isinstance(result, Skip) and result.reason == reason


def test_truncated_jpeg_passes_the_probe_but_fails_decode():
    data = _encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    raw = RawSample("k", "s.tar", {"jpg": data[: len(data) // 2], "txt": b"x"})
    decoder = _decoder(square_bucket(32))
    assert decoder.probe(raw) == Bucket(32, 32)  # the header is intact
    result = decoder.decode(raw, 0)
    assert isinstance(result, Skip) and result.reason == DECODE_ERROR


def test_probe_bucket_equals_decode_bucket():
    buckets = make_buckets(32 * 32, step=16)
    decoder = _decoder(buckets)
    for size in [(10, 40), (40, 10), (33, 31), (64, 36)]:
        raw = _raw(_encoded(Image.new("RGB", size)))
        decoded = decoder.decode(raw, 0)
        assert isinstance(decoded, Decoded) and decoder.probe(raw) == decoded.bucket


def test_synthetic_caption_from_sidecar_or_json_field():
    image = _encoded(Image.new("RGB", (30, 30)))
    sidecar = _decoder(synthetic=CaptionField.parse("syn.txt"), p_synthetic=1.0)
    assert sidecar.decode(_raw(image, **{"syn.txt": b"synthetic"}), 0).values == {
        "captions": "synthetic", "synthetic_captions": True, "flipped": False
    }
    # Without a synthetic caption the original is used.
    assert sidecar.decode(_raw(image), 0).values["captions"] == "a caption"
    field = _decoder(synthetic=CaptionField.parse("json:recaption"), p_synthetic=1.0)
    raw = _raw(image, json=json.dumps({"recaption": " from json "}).encode())
    assert field.decode(raw, 0).values["captions"] == "from json"
    never = _decoder(synthetic=CaptionField.parse("syn.txt"), p_synthetic=0.0)
    assert never.decode(_raw(image, **{"syn.txt": b"synthetic"}), 0).values["captions"] == "a caption"


def test_parse_extensions_and_caption_fields():
    assert parse_extensions("jpg; JPEG;.png;;webp") == ["jpg", "jpeg", "png", "webp"]
    with pytest.raises(ValueError):
        parse_extensions(" ; ")
    assert decode_text(b" a red circle on a white background\n") == "a red circle on a white background"
    assert CaptionField.parse(".SYN.txt") == CaptionField("syn.txt")
    assert CaptionField.parse("json:caption") == CaptionField("json", "caption")
    with pytest.raises(ValueError, match="names no JSON field"):
        CaptionField.parse("json:")
