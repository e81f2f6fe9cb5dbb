"""Image and caption decoding for streamed samples: bytes -> RGB -> shorter side R -> centre crop -> [-1, 1].

Pure functions of their inputs (no randomness), so they may run in any DataLoader worker.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def parse_extensions(spec: str) -> list[str]:
    """`"jpg;jpeg;png"` -> `["jpg", "jpeg", "png"]` (lower case, in order of preference)."""
    extensions = [part.strip().lower().lstrip(".") for part in spec.split(";")]
    extensions = [extension for extension in extensions if extension]
    if not extensions:
        raise ValueError(f"no file extension in {spec!r}")
    return extensions


def decode_image(data: bytes, resolution: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    With `resolution`, JPEG decoding is allowed to downscale by a power of two while keeping the
    shorter side >= resolution (`Image.draft`), which makes big JPEGs several times cheaper.
    """
    image = Image.open(io.BytesIO(data))
    if resolution is not None and image.format == "JPEG":
        image.draft("RGB", (resolution, resolution))
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_and_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is exactly `resolution`, then crop the centre square."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    width, height = image.size
    if min(width, height) != resolution:
        scale = resolution / min(width, height)
        # max(...) keeps the shorter side exact when rounding would push it below resolution.
        new_width = max(resolution, round(width * scale))
        new_height = max(resolution, round(height * scale))
        image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
        width, height = new_width, new_height
    if (width, height) != (resolution, resolution):
        left = (width - resolution) // 2
        top = (height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)
    return tensor.to(torch.float32) / 127.5 - 1.0


def image_bytes_to_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """The whole image path of the loader: bytes -> (3, resolution, resolution) float in [-1, 1]."""
    return image_to_tensor(resize_and_center_crop(decode_image(data, resolution), resolution))


def decode_caption(data: bytes | str) -> str:
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    return text.strip()
