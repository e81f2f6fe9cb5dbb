"""`shard_mmdit` (FSDP2) against one unsharded process: two gloo ranks, each with half of one global
batch and half of the MM-DiT's parameters, take the same optimizer steps (losses and weights equal
within fp32 tolerance) as one process that holds everything and sees the whole batch; so do four
ranks sharding in pairs and replicating across them (hybrid sharding)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from sd3train.lit.nonfinite import SkippableAdamW
from sd3train.model.mmdit import MMDiT
from sd3train.model.sharding import is_sharded, local_tensor, shard_mmdit
from tests.support.distributed import run_ranks
from tests.support.reference_models import perturb, relative_error

STEPS, BATCH = 3, 8


def build() -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=24,
                  pos_embed_max_size=8, sample_size=4, patch_size=1)
    return perturb(model)  # every weight random, the adaLN-Zero gates too: every block contributes


def batch() -> tuple[torch.Tensor, ...]:
    """One global batch, the same every step (so the loss falls): latents, t, context, pooled, target."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 4, 4, 4, generator=generator), torch.rand(BATCH, generator=generator),
            torch.randn(BATCH, 6, 32, generator=generator), torch.randn(BATCH, 24, generator=generator),
            torch.randn(BATCH, 4, 4, 4, generator=generator))


def train(model: MMDiT, rows: slice) -> list[float]:
    """STEPS AdamW steps on `rows` of the global batch; the global batch's mean loss per step."""
    optimizer = SkippableAdamW(model.parameters(), lr=1e-3)
    x, t, context, pooled, target = (tensor[rows] for tensor in batch())
    losses = []
    for _ in range(STEPS):
        loss = (model(x, t, context, pooled) - target).square().mean()
        loss.backward()  # FSDP2 averages the gradients over the ranks: the global mean's gradient
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss.item())
    return losses


def rank_main(rank: int, world_size: int, mesh_shape: tuple[int, ...], out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    # (2,): two shards. (2, 2): hybrid, two replicas of two shards each (what fsdp_hybrid builds
    # with 2 nodes of 2 ranks).
    names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")
    model = shard_mmdit(build(), init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
    local = sum(local_tensor(parameter).numel() for parameter in model.parameters())
    rows = BATCH // world_size  # every rank, replica or shard, takes its own part of the batch
    losses = train(model, slice(rank * rows, (rank + 1) * rows))
    weights = {name: parameter.full_tensor() for name, parameter in model.named_parameters()}
    if rank == 0:
        torch.save({"losses": losses, "weights": weights, "sharded": is_sharded(model)}, out)
    torch.save(local, f"{out}.{rank}")  # this rank's parameter count


@pytest.fixture(scope="module", params=[(2,), (2, 2)], ids=["fsdp", "hybrid"])
def sharded(request, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("fsdp") / "result.pt")
    world_size = math.prod(request.param)
    run_ranks(rank_main, world_size, request.param, out)
    result = torch.load(out)
    result["local"] = [torch.load(f"{out}.{rank}") for rank in range(world_size)]
    result["shards"] = request.param[-1]
    return result


def test_two_sharded_ranks_step_as_one_process_with_the_whole_batch(sharded):
    reference = build()
    expected = train(reference, slice(0, BATCH))
    assert sharded["sharded"]
    assert sharded["losses"] == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < expected[0]  # it trained
    for name, parameter in reference.named_parameters():
        # Per tensor, by norm: Adam divides a gradient by its own size, so where one is near zero a
        # summation-order difference can move that element by a sizeable part of lr (1e-3).
        assert relative_error(sharded["weights"][name], parameter.detach()) < 1e-5, name


def test_each_rank_holds_about_half_of_the_parameters(sharded):
    total = sum(parameter.numel() for parameter in build().parameters())
    replicas = len(sharded["local"]) // sharded["shards"]
    assert sum(sharded["local"]) == replicas * total  # each replica holds the model once
    for local in sharded["local"]:
        assert abs(local - total / 2) < 0.1 * total  # first dimensions of 1 stay whole on one shard
