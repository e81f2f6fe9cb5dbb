"""Memory and communication per GPU for each strategy, from the MM-DiT's real parameter count.

    python -m sd3train.bench.zero_memory --gpus 8 --gpu-gb 80            # sd3_medium and sd35_large
    python -m sd3train.bench.zero_memory --model sd35_large --gpus 16 --json

The model is built on the meta device (no memory), so the count is exact for the shipped config.
Per trainable parameter, mixed-precision AdamW keeps 16 bytes (the ZeRO paper's accounting): bf16
weights 2 and gradients 2, fp32 master weights 4 and Adam moments 4 + 4. With N ranks:

    ddp     16           every rank holds everything
    zero1   4 + 12 / N   optimizer states (master weights, moments) sharded
    zero2   2 + 14 / N   gradients sharded too
    zero3   16 / N       weights sharded too (gathered layer by layer when used)
    fsdp    16 / N       FSDP2 (strategy=fsdp): fp32 weights, gradients and moments sharded
    fsdp_keep 2 + 16 / N the same with strategy.reshard_after_forward=false, at the peak

Communication per optimizer step and rank, in parameter-sized messages of bf16: DDP all-reduces
the gradients (2 (N - 1) / N x 2 bytes per parameter with a ring); ZeRO-1/2 reduce-scatter the
gradients and all-gather the weights (the same volume); ZeRO-3 gathers the weights in the forward
and again in the backward pass (1.5x). FSDP2 does the same and reduce-scatters the gradients in
fp32 (2x; 1.5x with reshard_after_forward=false, which gathers once). Activations, the frozen encoders (T5-XXL is 4.7B parameters:
9.5 GB in bf16 unless the text embeddings are precomputed) and framework buffers come on top.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sd3train.config.compose import group_option
from sd3train.config.schema import ModelConfig
from sd3train.config.typed import build_typed
from sd3train.model.mmdit import MMDiT

PROG = "python -m sd3train.bench.zero_memory"
BYTES_PER_PARAMETER = {"ddp": lambda n: 16.0, "zero1": lambda n: 4 + 12 / n, "zero2": lambda n: 2 + 14 / n,
                       "zero3": lambda n: 16 / n,
                       # FSDP2 keeps fp32 weights and gradients sharded (reduced in fp32): 16 / N; with
                       # reshard_after_forward=false every block's bf16 weights stay gathered until
                       # its backward, 2 bytes more at the peak.
                       "fsdp": lambda n: 16 / n, "fsdp_keep": lambda n: 2 + 16 / n}
# Gradient/weight traffic per step relative to one all-reduce of bf16 gradients (an all-gather or a
# reduce-scatter of bf16 is half of one; FSDP2 reduce-scatters fp32 gradients, a whole one).
TRAFFIC = {"ddp": 1.0, "zero1": 1.0, "zero2": 1.0, "zero3": 1.5, "fsdp": 2.0, "fsdp_keep": 1.5}


def parameter_count(model_name: str) -> int:
    cfg, problems = build_typed(ModelConfig, group_option("model", model_name))
    if problems:
        raise ValueError(f"conf/model/{model_name}.yaml: {problems}")
    with torch.device("meta"):
        model = MMDiT.from_config(cfg)
    return sum(parameter.numel() for parameter in model.parameters())


def table(model_name: str, gpus: int) -> dict:
    parameters = parameter_count(model_name)
    allreduce_gb = 2 * (gpus - 1) / gpus * 2 * parameters / 1e9
    return {
        "model": model_name,
        "parameters": parameters,
        "gpus": gpus,
        "states_gb": {name: rule(gpus) * parameters / 1e9 for name, rule in BYTES_PER_PARAMETER.items()},
        "traffic_gb_per_step": {name: factor * allreduce_gb for name, factor in TRAFFIC.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="conf/model/<name>.yaml (repeatable); default sd3_medium, sd35_large")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    results = [table(name, args.gpus) for name in (args.model or ["sd3_medium", "sd35_large"])]
    if args.json:
        print(json.dumps(results))
        return 0
    for result in results:
        print(f"{result['model']}: {result['parameters'] / 1e9:.3f}B trainable parameters, {args.gpus} GPUs of {args.gpu_gb:g} GB")
        for name, states in result["states_gb"].items():
            fits = "fits" if states < args.gpu_gb else "does not fit"
            print(f"  {name:9s} weights+grads+optimizer {states:7.1f} GB per GPU ({fits} before activations); "
                  f"{result['traffic_gb_per_step'][name]:6.1f} GB sent per GPU per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
