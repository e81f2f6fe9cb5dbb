"""FID and KID against precomputed reference statistics, with Inception weights from a local file.

    weights = "weights/pt_inception-2015-12-05-6726825d.pth"            # pytorch-fid's file
    inception = load_inception(weights, device="cuda")
    reference = ReferenceStats.from_features(inception_features(inception, real_images), captions,
                                             meta={"inception_sha256": weights_fingerprint(weights)})
    reference.save("eval/reference_stats.pt")
    ...
    reference = ReferenceStats.load("eval/reference_stats.pt")
    features = inception_features(inception, generated_images)          # (N, 2048) float64
    fid = frechet_distance(reference, features)
    kid_mean, kid_std = kernel_inception_distance(reference, features, subset_size=1000, subsets=100)

The network is the standard FID Inception (torchmetrics' NoTrainInceptionV3 "inception-v3-compat",
torch-fidelity's TF1-compatible bilinear resize, so numbers compare with pytorch-fid and the
papers'). The maths is torchmetrics' too: its FrechetInceptionDistance and KernelInceptionDistance
are fed the features through an identity extractor, in float64, so Inception runs once per image
for both metrics. Nothing is ever downloaded: the weights file is required.

The metrics run with `sync_on_compute=False`: under DDP, gather the generated features before
calling them (summing the reference statistics over ranks would count them once per rank).
torchmetrics is imported inside the functions; importing it costs seconds.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sd3train.durable import replace, sync, temporary_file

FEATURE_DIM = 2048
FORMAT = "sd3train.reference_stats/1"  # marks a stats file, so another .pt is refused by name


def weights_fingerprint(path: str | Path, length: int = 16) -> str:
    """The first `length` hex digits of the file's sha256 (torch.hub names the FID file `...-6726825d.pth`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def load_inception(weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID Inception (2048 pooled features, TF-compatible resize) with the state_dict in `weights`
    (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's file)."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"Inception weights not found: {weights}")
    # torch-fidelity unpickles the file with weights_only=False; a safe load first refuses a pickle
    # that holds anything but tensors before that happens.
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{weights} is not an Inception state_dict: {error}") from error
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                                       feature_extractor_weights_path=str(weights), antialias=False)
    except Exception as error:  # wrong keys or shapes: load_state_dict is strict
        raise ValueError(f"{weights} does not load into the FID Inception: {error}") from error
    return extractor.to(device)


def inception_features(extractor: torch.nn.Module, images: Sequence[np.ndarray],
                       batch_size: int = 32) -> torch.Tensor:
    """(N, 2048) float64 CPU features of `images`, each (H, W, 3) uint8; sizes may differ between
    images (each is resized to 299 on its own)."""
    device = next(extractor.parameters()).device
    chunks = []
    start = 0
    while start < len(images):
        # A batch is a run of images of one shape, at most batch_size long.
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        batch = np.stack([_checked(image) for image in images[start:end]])  # (B, H, W, 3)
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
        with torch.inference_mode():
            chunks.append(extractor(pixels).double().cpu())  # (B, 2048)
        start = end
    if not chunks:
        return torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
    return torch.cat(chunks)


def _checked(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 images, got {image.dtype} of shape {image.shape}")
    return image


def _row_keys(features: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random 64-bit key per row, from the row's bytes and the seed."""
    salt = seed.to_bytes(16, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, salt=salt).digest(), "little")
                     for row in features], dtype=np.uint64)


def _kid_subset(features: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """The `limit` rows with the smallest keys, in key order.

    A bottom-k sample by content hash rather than a seeded permutation: the subset of a union is
    then the subset of the union of the parts' subsets, so merging the stats of shards gives the
    very rows the stats of all the features would hold.
    """
    rows = features.detach().to(torch.float32).cpu().contiguous()
    order = np.argsort(_row_keys(rows.numpy(), seed), kind="stable")[:limit]
    return rows[torch.from_numpy(order)]


@dataclass
class ReferenceStats:
    """What FID and KID need of the reference images: feature sums (FID) and a capped random
    subset of the features themselves (KID), plus their captions and provenance."""

    feature_sum: torch.Tensor  # (d,) float64
    feature_cov_sum: torch.Tensor  # (d, d) float64, the sum of x x^T
    count: int
    kid_features: torch.Tensor  # (m, d) float32, m <= max_kid_features
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    max_kid_features: int = 2048
    kid_seed: int = 0

    @classmethod
    def from_features(cls, features: torch.Tensor, captions: Sequence[str] = (), meta: dict | None = None,
                      max_kid_features: int = 2048, seed: int = 0) -> ReferenceStats:
        if features.ndim != 2:
            raise ValueError(f"expected (N, d) features, got shape {tuple(features.shape)}")
        if captions and len(captions) != len(features):
            raise ValueError(f"{len(features)} features but {len(captions)} captions")
        values = features.detach().to(torch.float64).cpu()
        return cls(feature_sum=values.sum(0), feature_cov_sum=values.T @ values, count=len(values),
                   kid_features=_kid_subset(features, max_kid_features, seed), captions=list(captions),
                   meta=dict(meta or {}), max_kid_features=max_kid_features, kid_seed=seed)

    @property
    def dim(self) -> int:
        return self.feature_sum.shape[0]

    def merge(self, other: ReferenceStats, meta: dict | None = None) -> ReferenceStats:
        """The stats of both feature sets (this one's first); `meta` defaults to this one's."""
        if (other.dim, other.max_kid_features, other.kid_seed) != (self.dim, self.max_kid_features, self.kid_seed):
            raise ValueError("cannot merge reference stats with different feature sizes, KID caps or seeds: "
                             f"{(self.dim, self.max_kid_features, self.kid_seed)} and "
                             f"{(other.dim, other.max_kid_features, other.kid_seed)}")
        if bool(self.captions) != bool(other.captions) and self.count and other.count:
            raise ValueError("cannot merge reference stats with captions and stats without")
        pooled = torch.cat([self.kid_features, other.kid_features])
        return ReferenceStats(self.feature_sum + other.feature_sum, self.feature_cov_sum + other.feature_cov_sum,
                              self.count + other.count, _kid_subset(pooled, self.max_kid_features, self.kid_seed),
                              self.captions + other.captions, dict(self.meta if meta is None else meta),
                              self.max_kid_features, self.kid_seed)

    def save(self, path: str | Path) -> Path:
        """Write the stats to `path` atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"format": FORMAT, "feature_sum": self.feature_sum, "feature_cov_sum": self.feature_cov_sum,
                "count": int(self.count), "kid_features": self.kid_features, "captions": list(self.captions),
                "meta": dict(self.meta), "max_kid_features": self.max_kid_features, "kid_seed": self.kid_seed}
        descriptor, temporary = temporary_file(path.parent, path.name)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                torch.save(blob, stream)
                sync(stream)
            replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference stats not found: {path}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a reference stats file: {error}") from error
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not a reference stats file (no {FORMAT!r} marker)")
        return cls(blob["feature_sum"], blob["feature_cov_sum"], int(blob["count"]), blob["kid_features"],
                   list(blob["captions"]), dict(blob["meta"]), int(blob["max_kid_features"]), int(blob["kid_seed"]))


class _Passthrough(torch.nn.Module):
    """An identity "extractor": the metrics' update() then takes (N, d) features. `num_features`
    spares the metric a dummy forward to find d."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _checked_features(reference: ReferenceStats, features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2 or features.shape[1] != reference.dim:
        raise ValueError(f"expected (N, {reference.dim}) features like the reference, got {tuple(features.shape)}")
    return features.detach().to(device="cpu", dtype=torch.float64)


def frechet_distance(reference: ReferenceStats, features: torch.Tensor) -> float:
    """FID between the reference statistics and `features` (N, d), computed in float64."""
    features = _checked_features(reference, features)
    if reference.count < 2 or len(features) < 2:
        raise ValueError(f"FID needs at least 2 samples on each side: reference {reference.count}, "
                         f"generated {len(features)}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Passthrough(reference.dim), reset_real_features=False,
                                      sync_on_compute=False)
    metric.real_features_sum = reference.feature_sum.to(torch.float64).clone()
    metric.real_features_cov_sum = reference.feature_cov_sum.to(torch.float64).clone()
    metric.real_features_num_samples = torch.tensor(reference.count, dtype=torch.long)
    metric.update(features, real=False)  # float64 in, so compute() casts back to float64, not float32
    return float(metric.compute())


def kernel_inception_distance(reference: ReferenceStats, features: torch.Tensor, subset_size: int = 1000,
                              subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets) between the reference's KID features and
    `features` (N, d): the unbiased MMD^2 with the cubic polynomial kernel, in float64.

    `subset_size` is capped at the size of the smaller set; the draws come from `seed` alone.
    """
    features = _checked_features(reference, features)
    subset_size = min(subset_size, len(reference.kid_features), len(features))
    if subset_size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side: reference {len(reference.kid_features)}, "
                         f"generated {len(features)}")
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        # "Metric `Kernel Inception Distance` will save all extracted features in buffer": intended.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Passthrough(reference.dim), subsets=subsets,
                                         subset_size=subset_size, reset_real_features=False,
                                         sync_on_compute=False)
    metric.update(reference.kid_features.to(torch.float64), real=True)
    metric.update(features, real=False)
    # compute() draws its subsets with torch.randperm from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
