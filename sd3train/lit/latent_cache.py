"""In-memory cache of VAE posterior moments, so each training image is encoded once per run.

For small datasets trained for many epochs (the shapes default, a finetune on a few thousand
images) the frozen VAE encoder costs as much as the MM-DiT step on a CPU. The cache stores the
posterior (mean, logvar) per sample rather than a latent, so every visit still draws a fresh
latent from it with the step's generator: training with and without the cache sees the same
numbers. It is only correct when the image a key decodes to never changes between visits, which
holds for our deterministic resize + centre crop (no random flips or crops).

It is a memo, not training state: it is rebuilt after a resume and never checkpointed. The moments
stay on the device that computed them, so a visit copies nothing between host and device (16 x 8 x 8
fp32 moments of the 4,096 shapes images take 34 MB). Datasets too big for memory belong in a
precomputed cache on disk instead.
"""

from __future__ import annotations

import warnings

import torch


class LatentMomentCache:
    """Moments by sample id; holds at most `max_samples` entries (later samples are encoded each time)."""

    def __init__(self, max_samples: int):
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_full = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._moments)

    def missing(self, ids: list[str]) -> list[int]:
        """Positions in `ids` with no cached moments."""
        return [index for index, sample_id in enumerate(ids) if sample_id not in self._moments]

    def store(self, ids: list[str], mean: torch.Tensor, logvar: torch.Tensor) -> None:
        """Keep each sample's (mean, logvar), each (C, h, w), where they are, until the cache is full."""
        for index, sample_id in enumerate(ids):
            if sample_id in self._moments:
                continue
            if len(self._moments) >= self.max_samples:
                if not self._warned_full:
                    warnings.warn(
                        f"latent cache is full at {self.max_samples} samples (data.latent_cache_max_samples); "
                        "further samples are encoded at every visit",
                        stacklevel=2,
                    )
                    self._warned_full = True
                return
            self._moments[sample_id] = (mean[index].detach().clone(), logvar[index].detach().clone())

    def moments(
        self, ids: list[str], encode: "callable", device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (B, C, h, w), for `ids`; `encode(positions)` encodes the uncached ones."""
        todo = self.missing(ids)
        self.misses += len(todo)
        self.hits += len(ids) - len(todo)
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if todo:
            mean, logvar = encode(todo)
            self.store([ids[index] for index in todo], mean, logvar)
            fresh = {index: (mean[row], logvar[row]) for row, index in enumerate(todo)}
        pairs = [fresh[index] if index in fresh else self._moments[ids[index]] for index in range(len(ids))]
        mean = torch.stack([pair[0].to(device) for pair in pairs])  # (B, C, h, w)
        logvar = torch.stack([pair[1].to(device) for pair in pairs])
        return mean, logvar
