"""The masked flow-matching loss: no gradient outside the mask, normalised by the masked area, and
the plain loss when the mask is all ones."""

from __future__ import annotations

import torch

from sd3train.diffusion.flow import masked_per_sample_mse, per_sample_mse


def test_elements_outside_the_mask_get_no_gradient_and_the_area_normalises():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 6, 6, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 6, 6, generator=generator)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, :3] = 1.0  # the top half of sample 0
    mask[1, :, :, :2] = 0.5  # a soft mask on two columns of sample 1
    losses = masked_per_sample_mse(prediction, target, mask)
    losses.sum().backward()
    outside = (mask == 0).expand_as(prediction)
    assert torch.all(prediction.grad[outside] == 0) and torch.all(prediction.grad[~outside] != 0)
    squared = (prediction.detach() - target) ** 2
    torch.testing.assert_close(losses[0], squared[0, :, :3].mean())  # the mean over the masked area
    torch.testing.assert_close(losses[1], squared[1, :, :, :2].mean())


def test_an_all_ones_mask_is_the_plain_loss():
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    torch.testing.assert_close(masked_per_sample_mse(prediction, target, torch.ones(3, 1, 5, 5)),
                               per_sample_mse(prediction, target))
