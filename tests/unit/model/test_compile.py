"""Compiled joint blocks (`sd3train.model.compile_blocks`): no graph break for the three released
structures, with and without activation checkpointing; forward and backward equal eager; a bounded
number of compiles over aspect buckets; names, copies and the compile switch.

Most tests compile with backend "aot_eager" (dynamo + AOT autograd, no code generation: fast); one
compiles a block with inductor.

    python -m pytest tests/unit/model/test_compile.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from sd3train.model import MMDiT, compile_blocks
from sd3train.model.attention import HOPPER_PRIORITY
from sd3train.model.compile import compile_enabled
from sd3train.model.embeddings import random_crop_offsets
from sd3train.model.mmdit import JointBlock
from tests.support.reference_models import MMDIT_DEPTH, MMDIT_VARIANTS, mmdit_inputs, perturb

TINY = dict(hidden_size=64, num_heads=2, in_channels=4, context_dim=96, pooled_dim=48, pos_embed_max_size=16,
            sample_size=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; compile_blocks raises it
        yield
    torch._dynamo.reset()


def released_like(name: str, checkpointing: str = "none", depth: int = MMDIT_DEPTH) -> MMDiT:
    """A tiny model of a released structure (tests.support.reference_models.MMDIT_VARIANTS), perturbed."""
    qk_norm, dual = MMDIT_VARIANTS[name]
    torch.manual_seed(0)
    model = MMDiT(depth=depth, **TINY, qk_norm=qk_norm, dual_attention_layers=dual,
                  activation_checkpointing=checkpointing)
    return perturb(model).train()


def forward_backward(model: MMDiT, pos_offset=None, height=12, width=20):
    out = model(*mmdit_inputs(height, width), pos_offset=pos_offset)
    out.square().mean().backward()
    return out.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def assert_same(compiled, eager):
    (out, grads), (expected_out, expected_grads) = compiled, eager
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,checkpointing", [
    *((name, mode) for name in MMDIT_VARIANTS for mode in ("none", "full", "selective")),
    ("sd3.5-medium", "every_k"),
])
def test_compiled_blocks_have_no_graph_break_and_give_eager_results_without_checkpointing(name, checkpointing):
    # The reference is eager without checkpointing: equal results show both that compiling changes
    # nothing and that every checkpointing mode, compiled, gives the gradients of none
    # (test_activation_checkpointing.py checks the modes eagerly).
    # SD3.5-Medium trains with random crops of the position table: they happen before the blocks, but
    # the whole forward runs with them here.
    generator = torch.Generator().manual_seed(4)
    pos_offset = random_crop_offsets(2, 6, 10, 16, generator) if name == "sd3.5-medium" else None
    eager = forward_backward(released_like(name, "none"), pos_offset)
    counter = CompileCounterWithBackend("aot_eager")
    model = compile_blocks(released_like(name, checkpointing), backend=counter)
    compiled = forward_backward(model, pos_offset)
    # fullgraph=True raises on any graph break; one frame per block structure (normal, dual, last).
    structures = {(block.x_block.dual_attention, block.context_block.pre_only, block.checkpointing)
                  for block in model.joint_blocks}
    assert counter.frame_count == len(structures)
    assert counters["graph_break"] == {}
    assert_same(compiled, eager)


def test_aspect_buckets_compile_a_block_at_most_twice():
    torch.manual_seed(0)
    block = perturb(JointBlock(64, 2, qk_norm="rms", dual_attention=True)).train()
    counter = CompileCounterWithBackend("eager")  # counts graphs; numerics are checked elsewhere
    block.compile(fullgraph=True, backend=counter)
    generator = torch.Generator().manual_seed(5)
    context, cond = torch.randn(2, 7, 64, generator=generator), torch.randn(2, 64, generator=generator)
    for image_tokens in (64, 60, 96, 48):  # 8x8, 6x10, 8x12, 6x8 patch grids
        x = torch.randn(2, image_tokens, 64, generator=generator)
        new_context, new_x = block(context, x, cond)
        (new_context.sum() + new_x.sum()).backward()
    assert counter.frame_count == 2  # static for the first shape, dynamic from the second on


def test_a_whole_model_over_aspect_buckets_compiles_every_block_within_the_limit():
    counter = CompileCounterWithBackend("eager")  # counts graphs; numerics are checked above
    # Structures: (dual, none), (normal, none), (normal, full), (last, full) for every_k with k=2.
    model = compile_blocks(released_like("sd3.5-medium", "every_k", depth=4), backend=counter)
    for height, width in ((16, 16), (12, 20), (16, 24), (12, 16)):
        model(*mmdit_inputs(height, width)).square().mean().backward()
    assert counter.frame_count == 2 * 4  # static, then dynamic, per structure
    with torch.no_grad():  # evaluation: one graph per structure (already dynamic), whatever the shape
        for height, width in ((16, 16), (12, 20)):
            model.eval()(*mmdit_inputs(height, width))
    # 12 graphs of one code object: past dynamo's default limit of 8 a block would run eagerly.
    assert counter.frame_count == 3 * 4


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_backend_compiles_into_the_graph(backend):
    eager_model = released_like("sd3.5-large")
    eager_model.attention_backend = backend
    eager = forward_backward(eager_model)
    counter = CompileCounterWithBackend("aot_eager")
    model = released_like("sd3.5-large")
    model.attention_backend = backend
    compiled = forward_backward(compile_blocks(model, backend=counter))
    assert counter.frame_count == 2 and counters["graph_break"] == {}
    assert_same(compiled, eager)


def test_a_priority_list_of_kernels_compiles_into_the_graph():
    # What "auto" gives on Hopper (cuDNN first, set_priority=True), run here on the CPU, where torch
    # skips the kernels CPU tensors lack: the context manager must trace without a graph break.
    torch.manual_seed(0)
    block = perturb(JointBlock(64, 2, qk_norm="rms")).eval()
    generator = torch.Generator().manual_seed(7)
    inputs = (torch.randn(2, 7, 64, generator=generator), torch.randn(2, 24, 64, generator=generator),
              torch.randn(2, 64, generator=generator))
    with torch.no_grad():
        expected = block(*inputs)
        counter = CompileCounterWithBackend("eager")
        block.compile(fullgraph=True, backend=counter)
        got = block(*inputs, HOPPER_PRIORITY)
    assert counter.frame_count == 1
    for tensor, reference in zip(got, expected):
        torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-6)


# 33 s on an idle 2-core CPU with a cold cache: inductor generates and builds C++ for forward and backward.
@pytest.mark.slow
def test_inductor_compiled_block_matches_eager():
    torch.manual_seed(0)
    block = perturb(JointBlock(64, 2, qk_norm="rms")).train()
    generator = torch.Generator().manual_seed(6)
    shapes = ((2, 7, 64), (2, 24, 64), (2, 64))  # context, image tokens, conditioning
    inputs = [torch.randn(shape, generator=generator, requires_grad=True) for shape in shapes]

    def run(module):
        for tensor in inputs:
            tensor.grad = None
        module.zero_grad()
        context, x = module(*inputs)
        (context.square().mean() + x.square().mean()).backward()
        return [context.detach(), x.detach()] + [tensor.grad.clone() for tensor in inputs] + [
            parameter.grad.clone() for parameter in module.parameters()]

    expected = run(block)
    block.compile(fullgraph=True)  # the default backend, inductor: generated C++ on this CPU
    for got, want in zip(run(block), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiling_keeps_parameter_names_and_a_copy_is_an_eager_model_of_its_own():
    model = released_like("sd3.5-medium")
    keys = list(model.state_dict())
    compile_blocks(model, backend="aot_eager")
    assert list(model.state_dict()) == keys
    assert all(block._compiled_call_impl is not None for block in model.joint_blocks)
    shadow = copy.deepcopy(model)  # what the EMA keeps
    assert all(block._compiled_call_impl is None for block in shadow.joint_blocks)
    with torch.no_grad():
        for parameter in shadow.parameters():
            parameter.mul_(0.5)
        # The copy computes with its own weights, not the compiled original's.
        assert not torch.allclose(shadow(*mmdit_inputs(12, 20)), model(*mmdit_inputs(12, 20)))


def test_compile_is_on_for_cuda_runs_unless_deepspeed_or_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not compile_enabled(None, "auto", "ddp")
    assert compile_enabled(True, "cpu", "ddp") and not compile_enabled(False, "gpu", "ddp")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compile_enabled(None, "auto", "ddp") and compile_enabled(None, "gpu", "ddp")
    assert not compile_enabled(None, "cpu", "ddp")
    assert not compile_enabled(None, "auto", "deepspeed")
