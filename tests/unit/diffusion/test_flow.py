"""Rectified-flow objective: the path's endpoints, its velocity, the loss and the per-bin loss sums."""

import pytest
import torch

from sd3train.diffusion.flow import binned_mean, interpolate, per_sample_mse, velocity_target


def _pair(seed: int = 0, shape=(3, 4, 5, 6)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_interpolate_is_data_at_t0_and_noise_at_t1():
    x0, noise = _pair()
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)


def test_interpolate_uses_each_samples_own_t():
    x0, noise = _pair()
    z = interpolate(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(z[0], x0[0])
    assert torch.equal(z[1], noise[1])
    torch.testing.assert_close(z[2], 0.75 * x0[2] + 0.25 * noise[2], rtol=0, atol=1e-6)


def test_path_derivative_equals_velocity_target():
    x0, noise = _pair(1)
    t0, t1 = torch.full((3,), 0.2), torch.full((3,), 0.7)
    slope = (interpolate(x0, noise, t1) - interpolate(x0, noise, t0)) / 0.5
    torch.testing.assert_close(slope, velocity_target(x0, noise), rtol=0, atol=1e-5)
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0, rtol=0, atol=0)


def test_interpolate_keeps_latent_dtype_and_rejects_wrong_t_shape():
    x0, noise = _pair()
    assert interpolate(x0.bfloat16(), noise.bfloat16(), torch.rand(3)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        interpolate(x0, noise, torch.rand(3, 1))


def test_per_sample_mse_hand_values_in_fp32():
    prediction = torch.zeros(2, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 4.0]]])
    loss = per_sample_mse(prediction.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.tolist() == [1.0, 5.0]  # (0 + 4 + 0 + 16) / 4 = 5


def test_binned_mean_hand_values():
    # n = 4 bins: [0, .25) [.25, .5) [.5, .75) [.75, 1]; t = 1 joins the last bin.
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.55, 0.999, 1.0])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    sums, counts = binned_mean(values, t, 4)
    assert sums.tolist() == [3.0, 3.0, 9.0, 13.0]
    assert counts.tolist() == [2.0, 1.0, 2.0, 2.0]
    assert sums.dtype == counts.dtype == torch.float64


def test_binned_mean_empty_bins_are_zero_and_totals_add_up():
    t = torch.rand(100, generator=torch.Generator().manual_seed(0)) * 0.5  # upper half stays empty
    values = torch.rand(100, generator=torch.Generator().manual_seed(1))
    sums, counts = binned_mean(values, t, 10)
    assert counts[5:].tolist() == [0.0] * 5 and sums[5:].tolist() == [0.0] * 5
    assert counts.sum().item() == 100
    torch.testing.assert_close(sums.sum(), values.sum())
