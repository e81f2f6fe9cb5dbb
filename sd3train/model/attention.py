"""Attention pieces of the MM-DiT: per-head RMSNorm, a qkv/proj projection module, joint attention.

Each stream (image, text) owns an `Attention` that only projects (`pre_attention` -> q, k, v;
`post_attention` -> output projection). The attention itself runs once over the concatenation of
both streams (`joint_attention`), which is what makes the MM-DiT "multi-modal".
Names (`qkv`, `proj`, `ln_q`, `ln_k`) follow Stability's official checkpoints.

Which SDPA kernel runs is `model.attention_backend` (`sdpa_backends` turns the name into the list
torch.nn.attention.sdpa_kernel takes); the list travels into `attention` as an argument, so a
compiled block bakes it into its graph instead of breaking it.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

QK_NORMS = (None, "rms")

# `model.attention_backend` -> the SDPA kernels it allows. "auto" is resolved per device by
# `sdpa_backends`; the others allow exactly one kernel (a device without it fails in SDPA, saying so).
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "math": (SDPBackend.MATH,),
}
# "auto" on Hopper: cuDNN's fused attention first (NVIDIA's cuDNN 9 figures put it ahead of
# FlashAttention-2, which is torch's flash kernel, on H100/H200), then torch's own order. Without
# set_priority torch tries cuDNN last, after flash and memory-efficient.
HOPPER_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH)


def sdpa_backends(name: str, device: torch.device) -> Optional[tuple[SDPBackend, ...]]:
    """The SDPA kernels `model.attention_backend=name` allows on `device`, in priority order;
    None: torch's own choice ("auto" anywhere but a CUDA device of compute capability 9.x)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name != "auto":
        return ATTENTION_BACKENDS[name]
    device = torch.device(device)
    if device.type == "cuda" and _cuda_major(device.index) == 9:
        return HOPPER_PRIORITY
    return None


@functools.lru_cache(maxsize=None)
def _cuda_major(index: Optional[int]) -> int:
    # Cached: asked once per forward, and the answer cannot change while the process runs.
    return torch.cuda.get_device_capability(index)[0]


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learnable scale (SD3's query/key norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares in fp32: in bf16 it underflows/overflows for large activations.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backends: Optional[Sequence[SDPBackend]] = None
) -> torch.Tensor:
    """Softmax attention of (B, heads, L, head_dim) inputs; returns (B, L, heads * head_dim).

    `backends`: the SDPA kernels allowed, first preferred (`sdpa_backends`); None: torch's choice.
    """
    batch, heads, length, head_dim = query.shape
    if backends is None:
        out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, L, head_dim)
    else:
        with sdpa_kernel(list(backends), set_priority=len(backends) > 1):
            out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, L, head_dim)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, L, heads*head_dim)


def joint_attention(
    context_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    image_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backends: Optional[Sequence[SDPBackend]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention over [context; image] tokens, split back: returns (context_out, image_out).

    Inputs are (B, heads, L_stream, head_dim); outputs (B, L_stream, heads * head_dim).
    Context comes first on the sequence axis, as in the official SD3 code.
    """
    context_length = context_qkv[0].shape[2]
    q, k, v = (torch.cat([c, x], dim=2) for c, x in zip(context_qkv, image_qkv))  # (B, heads, Lc+Lx, head_dim)
    out = attention(q, k, v, backends)  # (B, Lc+Lx, heads*head_dim)
    return out[:, :context_length], out[:, context_length:]


class Attention(nn.Module):
    """Projections of one stream: qkv (+ optional per-head RMSNorm on q and k) and the output proj.

    `pre_only` drops the output projection: the last block's text stream only supplies keys and
    values, so its attention output is never used.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: Optional[str] = None,
        pre_only: bool = False,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # Identity keeps the state dict free of ln_q/ln_k keys without qk norm, like the official files.
        self.ln_q = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.ln_k = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> q, k, v, each (B, heads, L, head_dim)."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, heads, head_dim)
        q, k, v = qkv.unbind(dim=2)  # each (B, L, heads, head_dim)
        q = self.ln_q(q)
        k = self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, heads, L, head_dim)

    def post_attention(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) attention output -> (B, L, dim) through the output projection."""
        if self.proj is None:
            raise RuntimeError("a pre-only attention has no output projection")
        return self.proj(out)

    def self_attention(self, x: torch.Tensor, backends: Optional[Sequence[SDPBackend]] = None) -> torch.Tensor:
        """Plain self-attention of one stream (MMDiT-X's extra image attention): (B, L, dim) -> (B, L, dim)."""
        return self.post_attention(attention(*self.pre_attention(x), backends))
