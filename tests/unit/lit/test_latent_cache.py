"""The in-memory VAE posterior cache: encodes each sample once and changes no numbers."""

from __future__ import annotations

import pytest
import torch

from sd3train.lit.latent_cache import LatentMomentCache
from sd3train.lit.module import SD3LitModule
from tests.support.config import tiny_config


class CountingEncoder:
    """Deterministic fake moments per sample id, recording which positions were asked for."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        self.calls: list[list[int]] = []

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(rows))
        values = torch.tensor([float(hash(self.ids[row]) % 1000) for row in rows])
        mean = values.view(-1, 1, 1, 1).expand(-1, 2, 3, 3).clone()  # (n, 2, 3, 3)
        return mean, -mean


def test_only_unseen_samples_are_encoded_and_order_is_kept():
    cache = LatentMomentCache(max_samples=10)
    first = ["a", "b", "c"]
    encoder = CountingEncoder(first)
    mean, logvar = cache.moments(first, encoder, torch.device("cpu"))
    assert encoder.calls == [[0, 1, 2]] and len(cache) == 3

    second = ["c", "d", "a"]
    encoder = CountingEncoder(second)
    again, again_logvar = cache.moments(second, encoder, torch.device("cpu"))
    assert encoder.calls == [[1]]  # only "d" is new
    assert torch.equal(again[0], mean[2]) and torch.equal(again[2], mean[0])
    assert torch.equal(again_logvar[2], logvar[0])
    assert (cache.hits, cache.misses) == (2, 4)


def test_a_full_cache_warns_once_and_still_returns_every_sample():
    cache = LatentMomentCache(max_samples=2)
    ids = ["a", "b", "c", "d"]
    with pytest.warns(UserWarning, match="data.latent_cache_max_samples"):
        mean, _ = cache.moments(ids, CountingEncoder(ids), torch.device("cpu"))
    assert mean.shape == (4, 2, 3, 3) and len(cache) == 2
    encoder = CountingEncoder(ids)
    cache.moments(ids, encoder, torch.device("cpu"))
    assert encoder.calls == [[2, 3]]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="max_samples"):
        LatentMomentCache(0)


def _module(runs_dir, cache: bool) -> SD3LitModule:
    cfg = tiny_config(runs_dir / "no-shards", runs_dir, f"data.cache_latents={str(cache).lower()}")
    return SD3LitModule(cfg)


def test_cached_and_uncached_training_latents_are_the_same(tmp_path):
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    batch = {"images": images, "captions": ["a red circle on a white background"] * 4,
             "keys": ["k0", "k1", "k2", "k3"], "urls": ["shard-0.tar"] * 4}
    plain, cached = _module(tmp_path, False), _module(tmp_path, True)
    calls = []
    original = cached.vae.encode_moments

    def counting(images):
        calls.append(images.shape[0])
        return original(images)

    cached.vae.encode_moments = counting
    for step in range(2):  # the second pass is served from the cache
        expected = plain._encode_batch(batch, torch.Generator().manual_seed(step))
        got = cached._encode_batch(batch, torch.Generator().manual_seed(step))
        for want, have in zip(expected, got):
            torch.testing.assert_close(have, want, rtol=0, atol=1e-6)
    assert calls == [4]
    # Same key from another shard is another sample.
    cached._encode_batch({**batch, "urls": ["shard-1.tar"] * 4}, None)
    assert calls == [4, 4]
