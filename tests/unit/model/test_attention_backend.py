"""`model.attention_backend`: the SDPA kernels each name allows, that the choice reaches SDPA, and that
the CPU kernels agree.

    python -m pytest tests/unit/model/test_attention_backend.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from sd3train.model import MMDiT
from sd3train.model import attention as attention_module
from sd3train.model.attention import HOPPER_PRIORITY, attention, sdpa_backends
from tests.support.reference_models import mmdit_inputs, perturb


def qkv(length=410, heads=2, head_dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, length, head_dim, generator=generator) for _ in range(3)]


def test_each_name_allows_its_kernel_and_auto_leaves_the_choice_to_torch_off_hopper():
    cpu = torch.device("cpu")
    assert sdpa_backends("auto", cpu) is None
    assert sdpa_backends("flash", cpu) == (SDPBackend.FLASH_ATTENTION,)
    assert sdpa_backends("cudnn", cpu) == (SDPBackend.CUDNN_ATTENTION,)
    assert sdpa_backends("efficient", cpu) == (SDPBackend.EFFICIENT_ATTENTION,)
    assert sdpa_backends("math", cpu) == (SDPBackend.MATH,)
    with pytest.raises(ValueError, match="auto, flash, cudnn, efficient, math"):
        sdpa_backends("fast", cpu)


@pytest.mark.parametrize("capability,expected", [((9, 0), HOPPER_PRIORITY), ((8, 0), None), ((10, 0), None)])
def test_auto_puts_cudnn_first_on_hopper_only(monkeypatch, capability, expected):
    attention_module._cuda_major.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    try:
        assert sdpa_backends("auto", torch.device("cuda", 0)) == expected
    finally:
        attention_module._cuda_major.cache_clear()
    assert HOPPER_PRIORITY[0] == SDPBackend.CUDNN_ATTENTION and SDPBackend.MATH in HOPPER_PRIORITY


def test_math_and_flash_give_the_same_attention_on_cpu():
    q, k, v = qkv()  # L=410: 256 image tokens of a 16x16 grid and 154 text tokens, head dim 64
    math = attention(q, k, v, sdpa_backends("math", q.device))
    flash = attention(q, k, v, sdpa_backends("flash", q.device))
    assert math.shape == (2, 410, 128)
    torch.testing.assert_close(flash, math, rtol=1e-5, atol=1e-5)


def test_the_chosen_kernel_is_the_one_sdpa_runs():
    # No memory-efficient kernel exists for CPU tensors: allowing only it must fail inside SDPA.
    q, k, v = qkv(length=8)
    with pytest.raises(RuntimeError, match="No viable backend for scaled_dot_product_attention"):
        attention(q, k, v, sdpa_backends("efficient", q.device))


def test_whole_model_agrees_across_cpu_backends_and_rejects_unknown_names():
    outputs = {}
    for backend in ("auto", "math", "flash"):
        torch.manual_seed(0)
        model = perturb(MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
                              pos_embed_max_size=16, sample_size=16, qk_norm="rms", dual_attention_layers=[0],
                              attention_backend=backend)).eval()
        with torch.no_grad():
            outputs[backend] = model(*mmdit_inputs(12, 20))
    torch.testing.assert_close(outputs["flash"], outputs["math"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["auto"], outputs["math"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        MMDiT(depth=1, hidden_size=64, num_heads=2, attention_backend="xformers")
