"""Raw samples (dicts of bytes from a tar) -> training samples, or the reason they are skipped.

Each decoder has two steps:
- `probe(raw)`: the cheap part (fields present, caption, image header, bucket) that decides
  whether the sample is kept and which bucket it joins, without decoding pixels;
- `decode(raw, epoch)`: everything, or `Skip(DECODE_ERROR)` when the payload does not decode.
Resume replays a worker's stream with `probe` alone plus the keys that failed to decode before
the checkpoint (recorded in the data state), so a replay costs tar reading, not image decoding.

Random choices per sample (synthetic caption, crop offset, flip) are hashes of (seed, key, epoch).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from sd3train.data.buckets import Bucket, cover_crop, nearest_bucket
from sd3train.data.captions import CaptionField, unit_draw, use_synthetic
from sd3train.data.skips import DECODE_ERROR, NO_CAPTION, NO_IMAGE, TOO_SMALL
from sd3train.data.tar_reader import RawSample


@dataclass(frozen=True)
class Skip:
    reason: str
    detail: str = ""


@dataclass
class Decoded:
    """One training sample: its bucket, tensors to stack into the batch, and per-sample values to list."""

    key: str
    url: str
    bucket: Any  # hashable; every batch holds one bucket
    tensors: dict[str, torch.Tensor]
    values: dict[str, Any]


def parse_extensions(spec: str) -> list[str]:
    """`"jpg;jpeg;png"` -> `["jpg", "jpeg", "png"]` (lower case, in order of preference)."""
    extensions = [part.strip().lower().lstrip(".") for part in spec.split(";")]
    extensions = [extension for extension in extensions if extension]
    if not extensions:
        raise ValueError(f"no file extension in {spec!r}")
    return extensions


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)
    return tensor.to(torch.float32) / 127.5 - 1.0


def _mask_of(raw: RawSample, image: Image.Image) -> Image.Image:
    """A sample's loss mask as an 8-bit image of the image's size: its "mask.png" field, else the
    image's alpha channel, else all ones (255)."""
    if "mask.png" in raw.fields:
        return Image.open(io.BytesIO(raw.fields["mask.png"])).convert("L").resize(image.size)
    if "A" in image.getbands():
        return image.getchannel("A")
    return Image.new("L", image.size, 255)


@dataclass(frozen=True)
class ImageDecoder:
    """Image + caption samples (the img2dataset layout) -> bucketed image tensors in [-1, 1]."""

    buckets: tuple[Bucket, ...]
    image_extensions: tuple[str, ...]
    caption: CaptionField
    synthetic: Optional[CaptionField] = None
    p_synthetic: float = 0.5
    seed: int = 0
    min_size: int = 0
    random_crop: bool = False
    random_flip: bool = False
    instance_prompt: Optional[str] = None  # the caption of samples without one (image folders)
    masks: bool = False  # add "masks" (1, h, w) in [0, 1]: the "mask.png" field, else PNG alpha, else ones

    def _caption(self, raw: RawSample) -> Optional[str]:
        return self.caption.read(raw.fields) or self.instance_prompt

    def _image_extension(self, raw: RawSample) -> Optional[str]:
        return next((extension for extension in self.image_extensions if extension in raw.fields), None)

    def probe(self, raw: RawSample) -> Union[Bucket, Skip]:
        extension = self._image_extension(raw)
        if extension is None:
            return Skip(NO_IMAGE, f"no field in {list(self.image_extensions)} (has {sorted(raw.fields)})")
        if self._caption(raw) is None:
            return Skip(NO_CAPTION, f"no caption {self.caption}")
        try:
            width, height = Image.open(io.BytesIO(raw.fields[extension])).size  # header only
        except Exception as error:  # PIL raises many types for bad headers
            return Skip(DECODE_ERROR, f"{type(error).__name__}: {error}")
        if min(width, height) < self.min_size:
            return Skip(TOO_SMALL, f"{width}x{height} is under data.min_size={self.min_size}")
        return nearest_bucket(list(self.buckets), width, height)

    def choose_caption(self, raw: RawSample, epoch: int) -> tuple[str, bool]:
        """(caption, is_synthetic) for this epoch's visit of the sample."""
        original = self._caption(raw) or ""
        if self.synthetic is None or not use_synthetic(self.seed, raw.key, epoch, self.p_synthetic):
            return original, False
        synthetic = self.synthetic.read(raw.fields)
        return (synthetic, True) if synthetic is not None else (original, False)

    def decode(self, raw: RawSample, epoch: int) -> Union[Decoded, Skip]:
        bucket = self.probe(raw)
        if isinstance(bucket, Skip):
            return bucket
        try:
            image = Image.open(io.BytesIO(raw.fields[self._image_extension(raw)]))
            original_width, original_height = image.size
            if image.format == "JPEG":
                # Let libjpeg downscale by a power of two while still covering the bucket: several
                # times cheaper for big photos.
                image.draft("RGB", (bucket.width, bucket.height))
            mask = _mask_of(raw, image) if self.masks else None  # at the (drafted) image's size
            image = image.convert("RGB") if image.mode != "RGB" else image
            offset = None
            if self.random_crop:
                offset = (unit_draw("crop-y", self.seed, raw.key, epoch), unit_draw("crop-x", self.seed, raw.key, epoch))
            image, (top, left) = cover_crop(image, bucket, offset)
            flipped = self.random_flip and unit_draw("flip", self.seed, raw.key, epoch) < 0.5
            if flipped:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = image_to_tensor(image)  # (3, h, w)
            tensors = {}
            if self.masks:
                # The same crop and flip as the image; (1, h, w) in [0, 1].
                mask, _ = cover_crop(mask, bucket, offset)
                if flipped:
                    mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                tensors["masks"] = torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0)[None]
        except Exception as error:
            return Skip(DECODE_ERROR, f"{type(error).__name__}: {error}")
        caption, synthetic = self.choose_caption(raw, epoch)
        return Decoded(
            key=raw.key,
            url=raw.url,
            bucket=bucket,
            tensors={
                "images": pixels,
                "original_sizes": torch.tensor([original_height, original_width]),
                "crop_offsets": torch.tensor([top, left]),
                **tensors,
            },
            values={"captions": caption, "synthetic_captions": synthetic, "flipped": flipped},
        )


def collate(samples: list[Decoded]) -> dict[str, Any]:
    """One batch: stacked tensors ("images" (B, 3, h, w), ...), lists of values, "keys" and "urls"."""
    batch: dict[str, Any] = {name: torch.stack([s.tensors[name] for s in samples]) for name in samples[0].tensors}
    for name in samples[0].values:
        batch[name] = [s.values[name] for s in samples]
    batch["keys"] = [s.key for s in samples]
    # Keys are only unique within a dataset; (url, key) names a sample anywhere.
    batch["urls"] = [s.url for s in samples]
    return batch
