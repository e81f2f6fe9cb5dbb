"""Image descriptors for near-duplicate search: unit vectors whose inner product is the similarity.

    descriptor = build_descriptor("thumbnail")                              # no weights, no torch
    descriptor = build_descriptor("sscd", weights="sscd_disc_mixup.torchscript.pt", device="cuda")
    prepared = [descriptor.prepare(image) for image in images]   # per image, CPU (threads are fine)
    vectors = descriptor.embed(np.stack(prepared))               # (B, dim) float32, unit norm

Images of one batch must have prepared arrays of one shape (`prepared.shape`); the embed stage
groups them so.

- `sscd` (sscd.py): the SSCD copy-detection model, 512-d; its similarity threshold for copies is
  about 0.5 (the value SD3 used; the authors quote 0.75 for 90% precision on DISC).
- `thumbnail`: the image resized to 16x16 (bilinear, antialiased: it averages when shrinking), each
  colour channel standardised (minus its mean, over its std), flattened (768-d), L2-normalised.
  Invariant to resizing and to a per-channel gain and offset (brightness, contrast, white balance),
  tolerant of re-encoding and a crop of a few percent; not of flips, rotations, large crops or
  desaturation. Good for exact and lightly edited copies, and as a test descriptor; its default
  threshold is 0.85: on the planted test sets (tests/support/dedup_shards.py: crop 2-5% per side, resize,
  colour shift, JPEG 30-60) copies score above 0.9 but for about 1 in 100 (a crop through fine
  detail: 0.75), and distinct images stay under 0.56. A
  channel under `FLAT_STD` levels of spread counts as flat and contributes zeros; an image flat in
  every channel gets the constant vector, so blank images match each other and nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DESCRIPTORS = ("sscd", "thumbnail")
DEFAULT_THRESHOLDS = {"sscd": 0.5, "thumbnail": 0.85}
THUMBNAIL_SIDE = 16
FLAT_STD = 2.0  # pixel levels (0-255): below this a channel is flat


@dataclass
class ThumbnailDescriptor:
    side: int = THUMBNAIL_SIDE

    @property
    def name(self) -> str:
        return f"thumbnail(side={self.side})"

    @property
    def draft_size(self) -> tuple[int, int]:
        """The size a JPEG may be decoded down to (libjpeg's power-of-two scaling) before `prepare`."""
        return 4 * self.side, 4 * self.side

    def prepare(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB") if image.mode != "RGB" else image
        small = image.resize((self.side, self.side), Image.Resampling.BILINEAR)
        channels = np.asarray(small, dtype=np.float64).transpose(2, 0, 1).reshape(3, -1)  # (3, side*side)
        spread = channels.std(axis=1, keepdims=True)
        flat = spread < FLAT_STD
        channels = np.where(flat, 0.0, (channels - channels.mean(axis=1, keepdims=True)) / np.maximum(spread, FLAT_STD))
        vector = channels.reshape(-1)
        norm = np.linalg.norm(vector)
        if norm == 0.0:  # flat everywhere: the constant direction, orthogonal to every standardised vector
            return np.full(vector.shape, 1.0 / np.sqrt(vector.size), dtype=np.float32)
        return (vector / norm).astype(np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch, dtype=np.float32)  # (B, 768): prepare did the work


class SSCDDescriptor:
    """The SSCD model on a device; `prepare` is its preprocessing (sscd.preprocess)."""

    def __init__(self, weights: str | Path, device: str, preprocessing: str = "small288", model: Any = None):
        import torch

        from sd3train.curation.sscd import load_sscd

        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True  # the same convolution algorithm on every run
            torch.backends.cudnn.benchmark = False
        self.model = model.eval().to(self.device) if model is not None else load_sscd(weights, self.device)
        self.preprocessing = preprocessing
        self.weights_digest = _file_digest(Path(weights)) if weights is not None else "random"

    @property
    def name(self) -> str:
        return f"sscd(weights={self.weights_digest}, {self.preprocessing})"

    @property
    def draft_size(self) -> None:
        """None: a JPEG is decoded at full size. libjpeg's scaled decode would shrink a large one
        before the bilinear resize, so it would not get the authors' preprocessing (and would
        differ from the same picture stored as PNG)."""
        return None

    def prepare(self, image: Image.Image) -> np.ndarray:
        from sd3train.curation.sscd import preprocess

        return preprocess(image, self.preprocessing)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            vectors = self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()  # (B, dim)
        if vectors.ndim != 2:
            raise ValueError(f"the SSCD model returned shape {vectors.shape}, not (batch, dim)")
        # Re-normalised here: a TorchScript file of unknown make may not end with an L2 norm.
        return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256: names the weights whatever their path."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def build_descriptor(name: str, weights: str | Path | None = None, device: str = "cpu",
                     preprocessing: str = "small288"):
    """The descriptor called `name` (one of DESCRIPTORS)."""
    if name == "thumbnail":
        return ThumbnailDescriptor()
    if name == "sscd":
        if weights is None:
            raise ValueError("the sscd descriptor needs its weights file")
        return SSCDDescriptor(weights, device, preprocessing)
    raise ValueError(f"unknown descriptor {name!r}; one of {', '.join(DESCRIPTORS)}")
