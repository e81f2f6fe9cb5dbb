"""SD3.5-Medium's random crop of the position table: offsets, the crop used, and centre crop by default."""

import pytest
import torch

from sd3train.model.embeddings import crop_pos_embed, crop_pos_embed_at, random_crop_offsets
from sd3train.model.mmdit import MMDiT

MAX = 16  # table side
HIDDEN = 64


def tiny_model() -> MMDiT:
    model = MMDiT(depth=2, hidden_size=HIDDEN, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                  pos_embed_max_size=MAX, sample_size=16)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero everywhere, so the positions reach the output
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def inputs(batch=2, height=8, width=12):
    generator = torch.Generator().manual_seed(2)
    return (
        torch.randn(batch, 4, height, width, generator=generator),
        torch.rand(batch, generator=generator),
        torch.randn(batch, 7, 96, generator=generator),
        torch.randn(batch, 48, generator=generator),
    )


def test_crop_at_an_offset_is_that_slice_of_the_full_table():
    model = tiny_model()
    table = model.pos_embed.reshape(MAX, MAX, HIDDEN)  # (rows, cols, D)
    offsets = torch.tensor([[0, 0], [5, 2], [12, 10]])  # grid 4x6: the last one touches both far edges
    crops = model.cropped_pos_embed(4, 6, offsets).reshape(3, 4, 6, HIDDEN)
    for crop, (top, left) in zip(crops, offsets.tolist()):
        assert torch.equal(crop, table[top : top + 4, left : left + 6])


def test_centre_offset_reproduces_the_centre_crop():
    table = tiny_model().pos_embed
    centre = torch.tensor([[(MAX - 4) // 2, (MAX - 6) // 2]])
    assert torch.equal(crop_pos_embed_at(table, MAX, 4, 6, centre), crop_pos_embed(table, MAX, 4, 6))


def test_forward_without_offset_is_unchanged_and_with_centre_offset_identical():
    model = tiny_model()
    latents, t, context, pooled = inputs()  # patch grid 4x6
    with torch.no_grad():
        default = model(latents, t, context, pooled)
        centre = model(latents, t, context, pooled, pos_offset=torch.tensor([[6, 5], [6, 5]]))
        shifted = model(latents, t, context, pooled, pos_offset=torch.tensor([[0, 0], [6, 5]]))
    assert torch.equal(centre, default)
    assert (shifted[0] - default[0]).abs().max() > 1e-3  # the first sample moved, the second did not
    torch.testing.assert_close(shifted[1], default[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("offsets", [[[-1, 0]], [[0, 11]], [[13, 0]]])
def test_offsets_leaving_the_table_raise(offsets):
    with pytest.raises(ValueError, match="leaves"):
        crop_pos_embed_at(tiny_model().pos_embed, MAX, 4, 6, torch.tensor(offsets))


def test_offset_rows_must_match_the_batch():
    with pytest.raises(ValueError, match="rows"):
        tiny_model()(*inputs(batch=2), pos_offset=torch.tensor([[0, 0]]))


@pytest.mark.parametrize("grid_h,grid_w,region", [(4, 6, None), (1, 16, None), (3, 5, 9), (8, 8, 8), (10, 2, 6)])
def test_random_offsets_cover_the_window_and_stay_inside_the_table(grid_h, grid_w, region):
    offsets = random_crop_offsets(4000, grid_h, grid_w, MAX, torch.Generator().manual_seed(0), region=region)
    assert offsets.shape == (4000, 2) and offsets.dtype == torch.int64
    for axis, grid in ((0, grid_h), (1, grid_w)):
        window = max(MAX if region is None else region, grid)
        low = (MAX - window) // 2
        values = offsets[:, axis]
        # Every top-left position of the window is drawn, and nothing outside it.
        assert set(values.tolist()) == set(range(low, low + window - grid + 1))
        assert values.min() >= 0 and (values + grid).max() <= MAX


def test_region_equal_to_the_grid_gives_the_centre_crop():
    offsets = random_crop_offsets(5, 4, 4, MAX, torch.Generator().manual_seed(0), region=4)
    assert offsets.tolist() == [[6, 6]] * 5


def test_offsets_are_a_function_of_the_generator_seed():
    draw = lambda seed: random_crop_offsets(8, 4, 6, MAX, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
