"""Regional compilation of the MM-DiT: each joint block compiled in place, with `fullgraph=True`.

    from sd3train.model import MMDiT, compile_blocks
    model = compile_blocks(MMDiT(depth=2, context_dim=96, pooled_dim=48, in_channels=4,
                                 pos_embed_max_size=16, sample_size=16))

Only the joint blocks are compiled (torchtitan's regional compilation): blocks of the same structure
share one compiled graph, so compile time does not grow with depth, and the embedders, the random
position crop and the final layer stay eager. `fullgraph=True` turns any graph break in a block into an
error instead of a silent slowdown. `nn.Module.compile` compiles in place: parameter names and the
state dict are unchanged (checkpoints, the EMA copy and the diffusers conversion see the same keys),
and a deep copy of a compiled model (the EMA shadow) is an ordinary eager model again.

A block compiles once for its first shapes, then once more with the image-token count dynamic the
first time an aspect bucket changes it; evaluation (eval mode, no gradients) adds one graph per
block structure.

Tests: `python -m pytest tests/unit/model/test_compile.py -q`.
"""

from __future__ import annotations

from typing import Optional

import torch

from sd3train.model.mmdit import MMDiT


def compile_blocks(model: MMDiT, **compile_kwargs) -> MMDiT:
    """Compile each of `model`'s joint blocks in place and return `model`.

    `compile_kwargs` go to torch.compile (e.g. backend="aot_eager" or a counting backend in tests,
    mode="max-autotune"); fullgraph defaults to True. Set activation checkpointing and the attention
    backend before: the compiled graphs trace them.
    """
    options = {"fullgraph": True, **compile_kwargs}
    # Dynamo keeps every graph of JointBlock.forward under that one code object, and past
    # recompile_limit graphs (8) it runs the block eagerly with only a warning. A block structure
    # takes up to four (static then dynamic shapes, training and evaluation), and SD3.5-Medium with
    # every_k checkpointing has five structures: raise the limit to what this model needs.
    structures = {(block.x_block.dual_attention, block.context_block.pre_only, block.checkpointing)
                  for block in model.joint_blocks}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(structures))
    for block in model.joint_blocks:
        block.compile(**options)
    return model


def compile_enabled(setting: Optional[bool], accelerator: str, strategy_name: str) -> bool:
    """The resolved `model.compile`: `setting` when given, else on for a CUDA run that is not DeepSpeed.

    `accelerator` is trainer.accelerator ("auto", "gpu", "cuda", "cpu"); "auto" means CUDA when there is
    one. DeepSpeed's ZeRO partitions and hooks parameters in ways compiled blocks do not follow, so auto
    leaves it off there (validation refuses model.compile=true with it).
    """
    if setting is not None:
        return setting
    if strategy_name == "deepspeed":
        return False
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
