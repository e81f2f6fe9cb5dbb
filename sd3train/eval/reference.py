"""The real images FID and KID compare against, read from webdataset shards (`eval.reference_shards`).

    for image, caption in reference_images("data/compose/val-000000.tar"): ...
    captions = reference_captions("data/compose/val-000000.tar", limit=256)

Samples are image + caption pairs in the img2dataset layout (`<key>.png|jpg|jpeg|webp` and
`<key>.txt`), read in shard order. A sample without an image, or whose image does not decode, is
skipped and counted (`ReferenceReport`), never fatal; an unreadable shard is reported the same way.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sd3train.data.sources import resolve_shard_urls
from sd3train.data.tar_reader import RawSample, read_shard

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXTENSION = "txt"


@dataclass
class ReferenceReport:
    """What reading the reference shards kept and skipped (reason -> count)."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) or "none"
        return f"{self.read} reference images read, skipped: {skipped}"


def _image_field(sample: RawSample) -> bytes | None:
    return next((sample.fields[ext] for ext in IMAGE_EXTENSIONS if ext in sample.fields), None)


def reference_images(spec: str, report: ReferenceReport | None = None,
                     with_pixels: bool = True) -> Iterator[tuple[np.ndarray | None, str]]:
    """(image (H, W, 3) uint8, caption) of every good sample of the shards `spec` names, in order;
    `with_pixels=False` yields None for the image and only checks the image field is there."""
    report = ReferenceReport() if report is None else report
    for url in resolve_shard_urls(spec):
        for event in read_shard(url):
            if not isinstance(event, RawSample):
                report.skipped[event.reason] += 1
                continue
            data = _image_field(event)
            if data is None:
                report.skipped["no_image"] += 1
                continue
            caption = event.fields.get(CAPTION_EXTENSION, b"").decode("utf-8", "replace").strip()
            image = None
            if with_pixels:
                try:
                    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
                except (OSError, ValueError, Image.DecompressionBombError):
                    report.skipped["decode_error"] += 1
                    continue
            report.read += 1
            yield image, caption


def reference_captions(spec: str, limit: int) -> list[str]:
    """The captions of the first `limit` good samples (without decoding their images)."""
    captions = []
    for _, caption in reference_images(spec, with_pixels=False):
        if len(captions) == limit:
            break
        captions.append(caption)
    return captions
