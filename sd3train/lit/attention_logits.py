"""How large the attention logits grow: train/attn_logit_max, the study of QK-norm (conf/study/qk_norm.yaml).

    sd3train-train ... model.compile=false 'trainer.callbacks=[sd3train.lit.attention_logits.AttentionLogitMonitor]'

SD3 (section 5.3.3) trains at high learning rates only with RMS-norm on queries and keys: without
it the attention logits grow until the softmax saturates and the loss diverges. At each logging
step (trainer.log_every_n_steps) this logs the largest |q . k| / sqrt(head_dim) of any joint
attention of the MM-DiT on that step's batch, read from the queries and keys the training forward
made (forward hooks on each stream's ln_q / ln_k, after the norm when there is one). The product
is formed only at those steps, in float32, one head at a time. Compiled blocks do not run hooks: it needs model.compile=false.
"""

from __future__ import annotations

import math

import lightning as L
import torch


def max_joint_logit(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> torch.Tensor:
    """Largest |q . k| / sqrt(d) over one joint attention whose streams' queries and keys (each
    (B, L_stream, heads, head_dim)) are given in the same stream order; one head at a time, so the
    score matrix is never (B, heads, L, L) at once."""
    q = torch.cat(queries, dim=1)  # (B, L, heads, head_dim)
    k = torch.cat(keys, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.stack([
        (torch.einsum("bld,bmd->blm", q[:, :, head].float(), k[:, :, head].float()) * scale).abs().amax()
        for head in range(q.shape[2])]).amax()


class AttentionLogitMonitor(L.Callback):
    """Logs train/attn_logit_max every trainer.log_every_n_steps steps (see the module docstring)."""

    def __init__(self) -> None:
        self._handles: list = []
        self._captured: dict[tuple[int, str, str], torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.cfg.model.compile:
            raise ValueError("AttentionLogitMonitor reads the queries and keys through forward hooks, which "
                             "compiled blocks skip: set model.compile=false")
        if not hasattr(pl_module.mmdit, "joint_blocks"):
            raise ValueError("AttentionLogitMonitor reads MM-DiT's joint attention: model.architecture must be mmdit, "
                             f"not {pl_module.cfg.model.architecture}")

    def _hook(self, key: tuple[int, str, str]):
        def capture(module, inputs, output) -> None:
            self._captured[key] = output.detach()
        return capture

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The step's metrics are logged when the step it ends is a multiple of log_every_n_steps.
        if (trainer.global_step + 1) % pl_module.cfg.trainer.log_every_n_steps:
            return
        for index, block in enumerate(pl_module.mmdit.joint_blocks):
            for stream in ("context_block", "x_block"):
                attn = getattr(block, stream).attn
                for name in ("ln_q", "ln_k"):
                    self._handles.append(getattr(attn, name).register_forward_hook(self._hook((index, stream, name))))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """After the training forward, before anything else runs the model (a recomputing backward,
        previews, the suite): unhook, and log what the forward made."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        blocks = sorted({index for index, _, _ in self._captured})
        if blocks:
            largest = max(max_joint_logit([self._captured[(i, s, "ln_q")] for s in ("context_block", "x_block")],
                                          [self._captured[(i, s, "ln_k")] for s in ("context_block", "x_block")])
                          for i in blocks)
            pl_module.log("train/attn_logit_max", largest, reduce_fx="max", sync_dist=True)
        self._captured.clear()
