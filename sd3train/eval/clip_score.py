"""CLIP score of generated images against their captions, with an OpenCLIP model from a local folder.

    scorer = load_clip("weights/CLIP-ViT-bigG-14-laion2B-39B-b160k", device="cuda")  # a hub snapshot
    per_sample = scorer.score(images, captions)        # (N,) float64, 100 * cos(image, caption)
    value = clip_score(scorer, images, captions)       # mean of max(100 * cos, 0)

The folder is an OpenCLIP repository snapshot: open_clip_config.json ({"model_cfg",
"preprocess_cfg"}) beside the weights (open_clip_model.safetensors or open_clip_pytorch_model.bin).
Nothing is downloaded, so the text tower must use open_clip's own BPE tokenizer (CLIP and
OpenCLIP ViTs do; SigLIP and other HF-tokenizer models need their tokenizer files in the folder).

The score clamps each sample before averaging: CLIP-S of Hessel et al. (2021) with w = 100 in
place of 2.5. torchmetrics' CLIPScore clamps the mean instead, max(mean(100 * cos), 0); the two
agree whenever every cosine is positive, as it is for any sensible model and caption.

Images are uint8 arrays preprocessed as tensors (antialiased resize of the shorter side, centre
crop, normalise), not through the PIL pipeline open_clip returns; the two differ by about 1e-3 in
the cosine, so use these scores only against scores from this module. open_clip is imported
inside the functions; importing it costs seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ClipScorer:
    """An OpenCLIP model, its tokenizer and its evaluation preprocessing, on one device."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess_cfg: dict, device: str | torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        self.mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(3, 1, 1)
        self.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        # open_clip's other cases (resize_mode "longest", a non-square "shortest") are for models
        # no CLIP score is computed with.
        if not (self.resize_mode == "squash" or (self.resize_mode == "shortest" and self.size[0] == self.size[1])):
            raise ValueError(f"preprocess_cfg resize_mode {self.resize_mode!r} at size {self.size} is not "
                             "supported (only 'squash', or 'shortest' at a square size)")

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) float32 model input of `images`, each (h, w, 3) uint8, on the scorer's device."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        batch = []
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) uint8 images, got {image.dtype} of shape {image.shape}")
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255  # (3, h, w)
            if self.resize_mode == "squash":
                pixels = TF.resize(pixels, list(self.size), interpolation=mode, antialias=True)
            else:  # shorter side to the model's size, then the centre crop: open_clip's eval transform
                pixels = TF.resize(pixels, [self.size[0]], interpolation=mode, antialias=True)
                pixels = TF.center_crop(pixels, list(self.size))
            # Bicubic overshoots; PIL's uint8 resize saturates at 0 and 255.
            batch.append((pixels.clamp(0, 1) - self.mean) / self.std)
        return torch.stack(batch).to(self.device)  # (B, 3, H, W)

    def score(self, images: Sequence[np.ndarray], captions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N,) float64 on CPU: 100 * cos(image embedding, caption embedding) per sample."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        scores = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = self.pixels(images[start:start + batch_size])
                tokens = self.tokenizer(list(captions[start:start + batch_size])).to(self.device)  # (B, L)
                image_embeddings = F.normalize(self.model.encode_image(pixels).double(), dim=-1)  # (B, E)
                text_embeddings = F.normalize(self.model.encode_text(tokens).double(), dim=-1)  # (B, E)
                scores.append(100 * (image_embeddings * text_embeddings).sum(-1).cpu())
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """The OpenCLIP model in the folder `path` (config and weights, see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {path}")
    config = path / "open_clip_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"CLIP model folder {path} has no open_clip_config.json")
    # open_clip only warns, and keeps its random init, when the folder holds no weights.
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise FileNotFoundError(f"CLIP model folder {path} has no weights (*.safetensors, *.bin or *.pth)")
    try:
        json.loads(config.read_text())["model_cfg"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{config} is not an OpenCLIP config with a model_cfg: {error}") from error
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return ClipScorer(model, tokenizer, model.visual.preprocess_cfg, device)


def clip_score(scorer: ClipScorer, images: Sequence[np.ndarray], captions: Sequence[str],
               batch_size: int = 32) -> float:
    """Mean over samples of max(100 * cos, 0) (CLIP-S with w = 100; see the module docstring)."""
    if not images:
        raise ValueError("clip_score needs at least one image")
    return float(scorer.score(images, captions, batch_size).clamp(min=0).mean())
