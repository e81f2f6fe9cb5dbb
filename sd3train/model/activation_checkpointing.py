"""Activation-checkpointing modes of the MM-DiT's joint blocks (`model.activation_checkpointing`).

`MMDiT.set_activation_checkpointing` gives each joint block its own mode from `block_checkpointing`;
the block wraps its forward in torch.utils.checkpoint itself (sd3train/model/mmdit.py, JointBlock),
with `selective_checkpoint_contexts` as the context_fn of the selective mode.

Tests: `python -m pytest tests/unit/model/test_activation_checkpointing.py -q`.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

# `model.activation_checkpointing`: what a joint block keeps for the backward pass.
#   none: every activation; full: only its inputs, the whole block runs again in backward;
#   selective: the outputs of the matmuls and attention (SELECTIVE_SAVE_OPS), the cheap elementwise
#     ops (norms, modulation, gates, GELU, residuals, casts) run again; torchtitan's per-op policy;
#   every_k: full on one block in k (blocks k-1, 2k-1, ..., as torchtitan counts), none on the rest.
ACTIVATION_CHECKPOINTING = ("none", "full", "selective", "every_k")
# Ops whose outputs selective checkpointing keeps: recomputing them would cost most of a forward.
# Every SDPA kernel is listed, so whichever `attention_backend` picks is kept (math is a composite of
# bmm and softmax: its bmm outputs are kept, the softmax recomputed).
SELECTIVE_SAVE_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "mm", "addmm", "bmm", "baddbmm",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(torch.ops.aten, name)
)


def selective_checkpoint_contexts():
    """`context_fn` of torch.utils.checkpoint for selective checkpointing (a fresh pair per call)."""
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(list(SELECTIVE_SAVE_OPS))


def block_checkpointing(mode: str, every: int, depth: int) -> list[str]:
    """Each joint block's own mode ("none", "full" or "selective") for a model-wide setting."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                         f"got {mode!r}")
    if mode != "every_k":
        return [mode] * depth
    if every < 1:
        raise ValueError(f"activation_checkpointing_every must be >= 1, got {every}")
    return ["full" if index % every == every - 1 else "none" for index in range(depth)]
