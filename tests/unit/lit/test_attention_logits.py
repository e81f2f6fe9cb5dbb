"""train/attn_logit_max: the largest joint-attention logit, from the queries and keys the forward made."""

import math

import pytest
import torch

from sd3train.lit.attention_logits import max_joint_logit
from sd3train.model.attention import joint_attention
from sd3train.model.mmdit import MMDiT


def test_max_joint_logit_is_the_largest_entry_of_the_joint_score_matrix():
    generator = torch.Generator().manual_seed(0)
    qc, kc = torch.randn(2, 3, 2, 8, generator=generator), torch.randn(2, 3, 2, 8, generator=generator)
    qx, kx = torch.randn(2, 5, 2, 8, generator=generator), torch.randn(2, 5, 2, 8, generator=generator)
    q, k = torch.cat([qc, qx], 1).transpose(1, 2), torch.cat([kc, kx], 1).transpose(1, 2)  # (B, heads, L, d)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(8)).abs().max()
    assert max_joint_logit([qc, qx], [kc, kx]) == pytest.approx(expected.item(), rel=1e-6)


def test_hooked_queries_and_keys_are_the_ones_the_joint_attention_uses(monkeypatch):
    # The monitor hooks ln_q / ln_k: their outputs are what pre_attention hands to joint_attention.
    torch.manual_seed(0)
    model = MMDiT(depth=1, hidden_size=32, num_heads=2, patch_size=1, in_channels=4, context_dim=16, pooled_dim=8,
                  pos_embed_max_size=4, sample_size=4, qk_norm="rms")
    captured = {}
    for stream in ("context_block", "x_block"):
        attn = getattr(model.joint_blocks[0], stream).attn
        for name in ("ln_q", "ln_k"):
            getattr(attn, name).register_forward_hook(lambda m, i, o, key=(stream, name): captured.__setitem__(key, o))
    seen = {}

    def spy(context_qkv, image_qkv, backends=None):
        seen["q"], seen["k"] = torch.cat([context_qkv[0], image_qkv[0]], 2), torch.cat([context_qkv[1], image_qkv[1]], 2)
        return joint_attention(context_qkv, image_qkv, backends)

    monkeypatch.setattr("sd3train.model.mmdit.joint_attention", spy)  # records, then runs the real one
    with torch.no_grad():
        model(torch.randn(2, 4, 4, 4), torch.rand(2), torch.randn(2, 3, 16), torch.randn(2, 8))
    expected = (seen["q"] @ seen["k"].transpose(-1, -2) / math.sqrt(16)).abs().max()
    got = max_joint_logit([captured[("context_block", "ln_q")], captured[("x_block", "ln_q")]],
                          [captured[("context_block", "ln_k")], captured[("x_block", "ln_k")]])
    assert got == pytest.approx(expected.item(), rel=1e-5)
