"""Activation memory of the MM-DiT's training forward, counted exactly without allocating it.

The real model runs its forward and loss on fake tensors (`torch._subclasses.FakeTensorMode`:
shapes, dtypes and devices, no data) under the training precision's autocast. A dispatch mode
records the storage of every tensor an operator creates, and the storages still alive are summed
twice: at the end of the forward and loss, still inside autocast (its cache then holds a bf16
copy of every weight used), and once autocast is left, as Lightning leaves it before the backward:
what autograd saved, what activation checkpointing kept (block inputs, or the selective policy's
cache), the step's inputs and the loss. Parameters and buffers are not counted (they exist
before the forward). Attention runs as the fused kernels do (torch's CPU flash kernel on fake
CPU tensors keeps q, k, v, the output and the fp32 log-sum-exp, as flash and cuDNN attention do
on a GPU), never as an L x L matrix; CPU autocast puts this model's matmuls in bf16 and its norms
in fp32, as CUDA autocast does.

Memory is linear in the batch size from batch 2 on (at batch 1 some slices are contiguous and
are not copied), so forwards at batch 2 and 3 give the part per sample and the part that is not
(bf16 weight copies). Storages are also attributed to the joint block that made them: the
backward of a checkpointed block recomputes it, and holds at most one block's difference from
`none` on top of what the forward kept.

    from sd3train.bench.activations import activation_profile
    profile = activation_profile(model_config, latent_h=64, latent_w=64, text_tokens=154, autocast_bf16=True)
    profile.backward.at(16)      # bytes held when the backward of a batch of 16 starts
Tests: `python -m pytest tests/unit/bench/test_memory.py -q`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sd3train.config.schema import ModelConfig
from sd3train.diffusion.flow import interpolate, per_sample_mse, velocity_target
from sd3train.model.mmdit import MMDiT

OUTSIDE_BLOCKS = "outside blocks"
PROFILE_BATCHES = (2, 3)


class LiveStorages(TorchDispatchMode):
    """Records the storage of each tensor that operators return (but the `excluded` storages), with
    the label current when it was made; `alive()` sums the bytes of those not yet freed, by label."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded
        self.label = OUTSIDE_BLOCKS
        self._records: dict[int, tuple[StorageWeakRef, int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.excluded:
                continue  # a view of a parameter or buffer
            record = self._records.get(key)
            if record is None or record[0].expired():  # a freed storage's address can be reused
                self._records[key] = (StorageWeakRef(storage), storage.nbytes(), self.label)
        return out

    def alive(self) -> dict[str, int]:
        # The young generation holds the forward's own objects; a full collection found the same
        # bytes on every checkpointing mode and took three times as long.
        gc.collect(0)
        totals: dict[str, int] = {}
        for reference, nbytes, label in self._records.values():
            if not reference.expired():
                totals[label] = totals.get(label, 0) + nbytes
        return totals


def live_bytes(model: MMDiT, batch: int, latent_h: int, latent_w: int, text_tokens: int,
               autocast_bf16: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes alive after one training forward and loss of `model` (built on fake tensors), by label
    ('block <i>' for what joint block i made, `OUTSIDE_BLOCKS` for the rest): (inside autocast, after it)."""
    excluded = {tensor.untyped_storage()._cdata for tensor in [*model.parameters(), *model.buffers()]}
    tracker = LiveStorages(excluded)
    handles = []
    for index, block in enumerate(model.joint_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda *_, label=f"block {index}": setattr(tracker, "label", label)))
        handles.append(block.register_forward_hook(lambda *_: setattr(tracker, "label", OUTSIDE_BLOCKS)))
    try:
        with tracker:
            # Made inside the training step, so they count: fp32 latents, noise, timesteps, text.
            latents = torch.randn(batch, model.in_channels, latent_h, latent_w)
            noise = torch.randn_like(latents)
            t = torch.rand(batch)
            context = torch.randn(batch, text_tokens, model.context_embedder.in_features)
            pooled = torch.randn(batch, model.y_embedder.mlp[0].in_features)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
            with autocast:
                prediction = model(interpolate(latents, noise, t), t, context, pooled)
                loss = per_sample_mse(prediction.float(), velocity_target(latents, noise)).mean()
                del prediction
                inside = tracker.alive()
            after = tracker.alive()
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return inside, after


@dataclasses.dataclass
class LinearBytes:
    """Bytes = fixed + per_sample * batch, in total and for what each joint block made."""

    fixed: int
    per_sample: int
    block_fixed: list[int]
    block_per_sample: list[int]

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample

    def block_at(self, index: int, batch: int) -> int:
        return self.block_fixed[index] + batch * self.block_per_sample[index]

    @classmethod
    def fit(cls, totals: list[dict[str, int]], depth: int) -> "LinearBytes":
        """From the totals by label at PROFILE_BATCHES (b and b + 1)."""
        first, second = PROFILE_BATCHES
        labels = [f"block {index}" for index in range(depth)]

        def split(one: int, two: int) -> tuple[int, int]:
            per_sample = two - one
            return one - first * per_sample, per_sample

        fixed, per_sample = split(sum(totals[0].values()), sum(totals[1].values()))
        blocks = [split(totals[0].get(label, 0), totals[1].get(label, 0)) for label in labels]
        return cls(fixed, per_sample, [block[0] for block in blocks], [block[1] for block in blocks])


@dataclasses.dataclass
class ActivationProfile:
    """`forward`: alive at the forward's end inside autocast; `backward`: alive when the backward starts."""

    forward: LinearBytes
    backward: LinearBytes

    def recompute(self, batch: int, without_checkpointing: "ActivationProfile") -> int:
        """The most one block's recomputation adds during the backward: a checkpointed block makes
        again what `none` keeps of it and this mode does not."""
        reference = without_checkpointing.backward
        return max([0, *(reference.block_at(index, batch) - self.backward.block_at(index, batch)
                         for index in range(len(reference.block_fixed)))])

    def peak(self, batch: int, without_checkpointing: "ActivationProfile") -> int:
        """Activation bytes at the higher of the two moments: the forward's end, or the backward's
        start plus one block's recomputation."""
        return max(self.forward.at(batch), self.backward.at(batch) + self.recompute(batch, without_checkpointing))


def activation_profile(config: ModelConfig, latent_h: int, latent_w: int, text_tokens: int,
                       autocast_bf16: bool) -> ActivationProfile:
    """The activation profile of `MMDiT.from_config(config)` in training mode (its activation
    checkpointing setting applies) at `latent_h` x `latent_w` latents and `text_tokens` tokens."""
    with FakeTensorMode():
        model = MMDiT.from_config(config).train()
        measured = [live_bytes(model, batch, latent_h, latent_w, text_tokens, autocast_bf16)
                    for batch in PROFILE_BATCHES]
    return ActivationProfile(
        forward=LinearBytes.fit([inside for inside, _ in measured], config.depth),
        backward=LinearBytes.fit([after for _, after in measured], config.depth),
    )
