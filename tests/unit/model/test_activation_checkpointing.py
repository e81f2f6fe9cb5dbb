"""Activation-checkpointing modes of the MM-DiT: which blocks recompute what, and that every mode gives
the gradients of `none` eagerly (compiled: tests/unit/model/test_compile.py). The recomputation is
checked eagerly and in compiled blocks.

    python -m pytest tests/unit/model/test_activation_checkpointing.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sd3train.model import MMDiT, compile_blocks
from sd3train.model.activation_checkpointing import block_checkpointing
from tests.support.reference_models import mmdit_inputs, perturb

MODES = ("full", "selective", "every_k")
# The sizes of tests.support.reference_models' tiny diffusers transformer (width 64, 2 heads).
TINY = dict(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48,
            pos_embed_max_size=16, sample_size=16)


def inputs():
    return mmdit_inputs(12, 20)  # a 6x10 patch grid


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; compile_blocks raises it
        yield
    torch._dynamo.reset()


def sd35_medium_like(mode: str = "none", every: int = 2) -> MMDiT:
    """Depth 3 with RMS QK-norm and a dual-attention block: every kind of joint block SD3.5 has."""
    torch.manual_seed(0)
    model = MMDiT(**{**TINY, "depth": 3}, qk_norm="rms", dual_attention_layers=[0],
                  activation_checkpointing=mode, activation_checkpointing_every=every)
    return perturb(model).train()


def gradients(model: MMDiT) -> dict[str, torch.Tensor]:
    model(*inputs()).square().mean().backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_every_k_checkpoints_one_block_in_k_counting_as_torchtitan():
    assert block_checkpointing("every_k", 2, 5) == ["none", "full", "none", "full", "none"]
    assert block_checkpointing("every_k", 3, 6) == ["none", "none", "full", "none", "none", "full"]
    assert block_checkpointing("every_k", 1, 3) == ["full"] * 3
    assert block_checkpointing("selective", 2, 2) == ["selective"] * 2
    model = MMDiT(**{**TINY, "depth": 4}, activation_checkpointing="every_k", activation_checkpointing_every=2)
    assert [block.checkpointing for block in model.joint_blocks] == ["none", "full", "none", "full"]


def test_old_true_and_false_read_as_full_and_none():
    assert MMDiT(**TINY, activation_checkpointing=True).activation_checkpointing == "full"
    assert MMDiT(**TINY, activation_checkpointing=False).activation_checkpointing == "none"


@pytest.mark.parametrize("kwargs", [dict(activation_checkpointing="some"),
                                    dict(activation_checkpointing="every_k", activation_checkpointing_every=0)])
def test_invalid_checkpointing_raises_naming_the_choices(kwargs):
    with pytest.raises(ValueError, match="activation_checkpointing"):
        MMDiT(**TINY, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_gradients_of_none(mode):
    # Compiled, each mode is compared with eager none in test_compile.py.
    reference = gradients(sd35_medium_like("none"))
    grads = gradients(sd35_medium_like(mode))
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert reference["joint_blocks.0.x_block.attn2.qkv.weight"].abs().sum() > 0


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (cached outputs selective checkpointing hands back do not)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode,recomputed_matmuls,recomputed_norms", [
    ("none", False, False), ("full", True, True), ("selective", False, True),
])
def test_what_the_backward_pass_runs_again(mode, recomputed_matmuls, recomputed_norms, compiled):
    # The forward's matmuls are addmm (Linear with bias) and the attention is SDPA; backward's own
    # gradient matmuls are mm, and a norm's backward is native_layer_norm_backward, not the forward.
    # Compiled with aot_eager, the backward graph runs op by op, so the count sees what the traced
    # checkpoint recomputes there.
    model = sd35_medium_like(mode)
    if compiled:
        compile_blocks(model, backend="aot_eager")
    loss = model(*inputs()).square().mean()
    with OpCounter() as counter:
        loss.backward()
    attention = sum(count for name, count in counter.counts.items()
                    if name.startswith("_scaled_dot_product") and not name.endswith("backward"))
    assert (counter.counts.get("addmm", 0) > 0) == recomputed_matmuls
    assert (attention > 0) == recomputed_matmuls
    assert (counter.counts.get("native_layer_norm", 0) > 0) == recomputed_norms
    assert (counter.counts.get("rsqrt", 0) > 0) == recomputed_norms  # the RMS QK-norm


def test_no_checkpointing_in_eval_or_without_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *args, **kwargs: calls.append(1))
    for mode in MODES:
        model = sd35_medium_like(mode)
        with torch.no_grad():
            model(*inputs())
        model.eval()(*inputs())
    assert calls == []
