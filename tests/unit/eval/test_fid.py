"""FID and KID: the project's numbers against references written here (scipy, numpy), the reference
statistics' file and merge, and the Inception loaded from a local random weights file."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sd3train.eval.fid import (
    ReferenceStats,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    load_inception,
)
from tests.support.eval_models import write_random_inception

DIM, COUNT = 64, 500  # more samples than dimensions: a full-rank covariance, so self-FID is ~1e-13


def _features(seed: int, count: int = COUNT, shift: float = 0.0, mixing: float = 0.0) -> np.ndarray:
    """(count, DIM) float64 Gaussian features, with an optional mean shift and correlated covariance."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((count, DIM))
    if mixing:
        values = values @ (np.eye(DIM) + mixing * rng.standard_normal((DIM, DIM)))
    return values + shift


def _fid_reference(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, s1 = real.mean(0), np.cov(real, rowvar=False)
    mu2, s2 = fake.mean(0), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _kid_reference(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel (Binkowski et al.), for two sets of the same size."""
    gamma = 1.0 / x.shape[1]

    def kernel(a, b):
        return (a @ b.T * gamma + coef) ** degree

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m = x.shape[0]
    return float(((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


@pytest.fixture(scope="module")
def real_and_fake():
    return _features(0), _features(1, count=400, shift=0.3, mixing=0.2)


@pytest.mark.parametrize("fake_seed, shift, mixing", [(1, 0.3, 0.2), (2, 0.0, 0.0)])
def test_frechet_distance_matches_scipy_reference(fake_seed, shift, mixing):
    real, fake = _features(0), _features(fake_seed, count=400, shift=shift, mixing=mixing)
    ours = frechet_distance(ReferenceStats.from_features(torch.from_numpy(real)), torch.from_numpy(fake))
    assert ours == pytest.approx(_fid_reference(real, fake), rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
    real = torch.from_numpy(_features(0))
    assert abs(frechet_distance(ReferenceStats.from_features(real), real)) < 1e-6


def test_fid_needs_two_samples_on_each_side(real_and_fake):
    real, fake = (torch.from_numpy(values) for values in real_and_fake)
    with pytest.raises(ValueError, match="at least 2 samples.*generated 1"):
        frechet_distance(ReferenceStats.from_features(real), fake[:1])
    with pytest.raises(ValueError, match="at least 2 samples.*reference 1"):
        frechet_distance(ReferenceStats.from_features(real[:1]), fake)
    with pytest.raises(ValueError, match="expected \\(N, 64\\) features"):
        frechet_distance(ReferenceStats.from_features(real), fake[:, :32])


def test_kid_with_one_subset_of_everything_matches_numpy_reference(real_and_fake):
    real, fake = real_and_fake[0][:400], real_and_fake[1]
    reference = ReferenceStats.from_features(torch.from_numpy(real), max_kid_features=400)
    mean, std = kernel_inception_distance(reference, torch.from_numpy(fake), subset_size=400, subsets=1)
    # The estimator is a sum over all pairs, so the order the KID subset keeps the rows in does not matter.
    assert mean == pytest.approx(_kid_reference(real, fake), rel=1e-6)
    assert std == 0.0


def test_kid_subset_size_is_capped_at_the_smaller_set(real_and_fake):
    real, fake = (torch.from_numpy(values) for values in real_and_fake)
    reference = ReferenceStats.from_features(real, max_kid_features=300)
    capped = kernel_inception_distance(reference, fake, subset_size=10_000, subsets=1)
    assert capped[0] == pytest.approx(kernel_inception_distance(reference, fake, subset_size=300, subsets=1)[0],
                                      rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(reference, fake[:1])


def test_kid_is_deterministic_given_the_seed_and_leaves_the_global_generator_alone(real_and_fake):
    real, fake = (torch.from_numpy(values) for values in real_and_fake)
    reference = ReferenceStats.from_features(real)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = kernel_inception_distance(reference, fake, subset_size=100, subsets=5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert kernel_inception_distance(reference, fake, subset_size=100, subsets=5, seed=7) == first
    assert kernel_inception_distance(reference, fake, subset_size=100, subsets=5, seed=8) != first
    assert first[1] > 0  # five different subsets


def test_kid_features_are_a_capped_deterministic_subset_of_the_rows(real_and_fake):
    real = torch.from_numpy(real_and_fake[0])
    stats = ReferenceStats.from_features(real, max_kid_features=100)
    assert stats.kid_features.shape == (100, DIM) and stats.kid_features.dtype == torch.float32
    rows = {tuple(row) for row in real.float().tolist()}
    assert all(tuple(row) in rows for row in stats.kid_features.tolist())
    assert torch.equal(ReferenceStats.from_features(real, max_kid_features=100).kid_features, stats.kid_features)
    assert not torch.equal(ReferenceStats.from_features(real, max_kid_features=100, seed=1).kid_features,
                           stats.kid_features)
    assert ReferenceStats.from_features(real[:50], max_kid_features=100).kid_features.shape == (50, DIM)


def test_saved_and_loaded_stats_give_identical_fid_and_kid(tmp_path, real_and_fake):
    real, fake = (torch.from_numpy(values) for values in real_and_fake)
    captions = [f"caption {index}" for index in range(len(real))]
    stats = ReferenceStats.from_features(real, captions, meta={"shards": ["a.tar"]}, max_kid_features=200)
    path = stats.save(tmp_path / "stats" / "reference.pt")
    loaded = ReferenceStats.load(path)
    assert [item.name for item in path.parent.iterdir()] == ["reference.pt"]  # no temporary left behind
    assert (loaded.count, loaded.captions, loaded.meta) == (len(real), captions, {"shards": ["a.tar"]})
    assert frechet_distance(loaded, fake) == frechet_distance(stats, fake)
    assert kernel_inception_distance(loaded, fake, 100, 3) == kernel_inception_distance(stats, fake, 100, 3)


def test_loading_a_missing_or_foreign_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ReferenceStats.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a reference stats file"):
        ReferenceStats.load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="text.pt is not a reference stats file"):
        ReferenceStats.load(tmp_path / "text.pt")


def test_merged_stats_of_two_batches_equal_the_stats_of_all_features(real_and_fake):
    real, fake = (torch.from_numpy(values) for values in real_and_fake)
    captions = [f"caption {index}" for index in range(len(real))]
    whole = ReferenceStats.from_features(real, captions, max_kid_features=150)
    merged = ReferenceStats.from_features(real[:180], captions[:180], max_kid_features=150).merge(
        ReferenceStats.from_features(real[180:], captions[180:], max_kid_features=150))
    assert merged.count == whole.count and merged.captions == whole.captions
    torch.testing.assert_close(merged.feature_sum, whole.feature_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.feature_cov_sum, whole.feature_cov_sum, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.kid_features, whole.kid_features)
    assert frechet_distance(merged, fake) == pytest.approx(frechet_distance(whole, fake), rel=1e-9)
    with pytest.raises(ValueError, match="different feature sizes, KID caps or seeds"):
        whole.merge(ReferenceStats.from_features(real, max_kid_features=150, seed=1))


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def inception(inception_weights):
    return load_inception(inception_weights)


def _test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 64, 3))
    return [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8), np.ascontiguousarray(ramp),
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)]


def test_inception_features_are_finite_2048_vectors_that_differ_between_images(inception):
    images = _test_images()
    features = inception_features(inception, images, batch_size=2)
    assert features.shape == (5, 2048) and features.dtype == torch.float64 and features.device.type == "cpu"
    assert torch.isfinite(features).all() and features.abs().sum() > 0
    distances = torch.cdist(features, features)
    assert (distances + torch.eye(5)).min() > 1e-3  # every pair of images differs
    # Batching (and splitting batches where the image size changes) does not change the features.
    torch.testing.assert_close(inception_features(inception, images[::-1], batch_size=32), features.flip(0),
                               rtol=1e-4, atol=1e-5)


def test_inception_refuses_bad_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception_features(inception, [np.zeros((64, 64, 3), np.float32)])


def test_load_inception_names_a_missing_or_unloadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/inception.pth"):
        load_inception(tmp_path / "nowhere" / "inception.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth does not load into the FID Inception"):
        load_inception(tmp_path / "wrong.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="garbage.pth is not an Inception state_dict"):
        load_inception(tmp_path / "garbage.pth")
