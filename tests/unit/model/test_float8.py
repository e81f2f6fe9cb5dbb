"""Float8 training of the joint blocks (torchao, emulated on CPU): which layers convert, that the
numerics stay near bf16 without being bf16, and that float8 + compiled blocks + FSDP2 run with
zero graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd3train.model.compile import compile_blocks
from sd3train.model.float8 import convert_blocks_to_float8, float8_linears
from sd3train.model.mmdit import MMDiT
from sd3train.model.sharding import shard_mmdit
from tests.support.distributed import run_ranks
from tests.support.reference_models import perturb


def build() -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=24,
                  pos_embed_max_size=8, sample_size=4, patch_size=1)
    return perturb(model)  # every weight random, the adaLN-Zero gates too: every block contributes


def inputs(batch: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 4, 4, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 6, 32, generator=generator), torch.randn(batch, 24, generator=generator))


def test_the_attention_and_mlp_linears_convert_and_the_rest_stays():
    model = build()
    keys = list(model.state_dict())
    convert_blocks_to_float8(model, "tensorwise")
    assert model.state_dict().keys() == set(keys) or list(model.state_dict()) == keys  # checkpoints unchanged
    converted = {name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"}
    # Per block: the context and image streams' qkv, proj, fc1, fc2; the context stream of the last
    # block is pre-only (qkv alone).
    assert len(converted) == float8_linears(model) == 8 + 5
    assert all(name.startswith("joint_blocks.") for name in converted)
    assert not any("adaLN_modulation" in name for name in converted)
    assert isinstance(model.final_layer.linear, nn.Linear) and type(model.final_layer.linear) is nn.Linear
    assert convert_blocks_to_float8(build(), "none").state_dict().keys() == set(keys)
    with pytest.raises(ValueError, match="model.float8"):
        convert_blocks_to_float8(build(), "blockwise")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_float8_stays_near_bf16_without_being_it(recipe):
    reference, model = build(), convert_blocks_to_float8(build(), recipe, emulate=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(*inputs()).float(), model(*inputs()).float()
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.05, error  # float8 e4m3 keeps about 2 significant digits per value
    got.square().mean().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def rank_main(rank: int, world_size: int, out: str) -> None:
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh

    torch._dynamo.reset()
    counters.clear()
    # torchtitan's order: float8, compile (aot_eager: dynamo's graphs without inductor's codegen), shard.
    model = compile_blocks(convert_blocks_to_float8(build(), "tensorwise", emulate=True), backend="aot_eager")
    shard_mmdit(model, init_device_mesh("cpu", (world_size,)), param_dtype=torch.bfloat16)
    for _ in range(2):
        model(*inputs()).float().square().mean().backward()
    torch.save({"graph_breaks": sum(counters["graph_break"].values()),
                "graphs": counters["stats"]["unique_graphs"]}, f"{out}.{rank}")


def test_float8_compiled_blocks_under_fully_shard_have_no_graph_breaks(tmp_path):
    out = str(tmp_path / "counters")
    run_ranks(rank_main, 2, out)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        assert result["graph_breaks"] == 0
        # Two block structures (the last block's context stream is pre-only), each one graph.
        assert result["graphs"] == 2, result
