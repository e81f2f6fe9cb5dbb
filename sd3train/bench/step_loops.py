"""The bare training loops `python -m sd3train.bench.train_step` times: our MM-DiT and diffusers'
`SD3Transformer2DModel` on one fixed batch, forward + MSE loss + backward + fused AdamW.

The diffusers baseline: `SD3Transformer2DModel` built from the same conf/model config (converted
keys, the same weights where both run in one process), its default attention processor, the same
batch, bf16 autocast over fp32 weights under `--dtype bf16`, fused AdamW; its own (full) gradient
checkpointing only when ours checkpoints fully, and never compiled.

Also the per-variant results: `timing_result` (median ms/step, TFLOP/s, MFU) and `peak_memory`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sd3train.config.schema import ModelConfig
from sd3train.model.compile import compile_blocks
from sd3train.model.mmdit import TIMESTEP_SCALE, MMDiT

LATENT_DOWNSAMPLE = 8
SEED = 0
LEARNING_RATE = 1e-4
MISSING_DIFFUSERS = (
    "the benchmark compares against diffusers' SD3Transformer2DModel, and diffusers is not installed; "
    "install the test extra: pip install -e '.[test]'"
)


def build_reference(config: ModelConfig, ours: MMDiT) -> torch.nn.Module:
    """diffusers' SD3Transformer2DModel for `config`, holding `ours`'s weights (converted keys), on
    `ours`'s device."""
    try:
        import diffusers
    except ImportError as error:
        raise ModuleNotFoundError(MISSING_DIFFUSERS) from error
    # Here, not at the top: they import transformers, which the other variants' processes do not need.
    from sd3train.checkpoint.export_diffusers import transformer_config
    from sd3train.checkpoint.mmdit_diffusers import official_to_diffusers

    settings = {key: value for key, value in transformer_config(config).items() if not key.startswith("_")}
    device = next(ours.parameters()).device
    with torch.device(device):
        reference = diffusers.SD3Transformer2DModel.from_config(settings)
    reference.to(device)  # tables diffusers builds from numpy land on the CPU whatever the default device
    reference.load_state_dict(official_to_diffusers(ours.state_dict(), config.depth), strict=True)
    if config.activation_checkpointing == "full":  # diffusers has no other mode
        reference.enable_gradient_checkpointing()
    return reference


def make_batch(config: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """One fixed random batch, fp32 as the training loop feeds it (autocast casts inside)."""
    generator = torch.Generator().manual_seed(SEED)
    height, width = (side // LATENT_DOWNSAMPLE for side in args.image_size)
    shapes = {
        "latents": (args.batch, config.in_channels, height, width),  # noisy latents x_t
        "context": (args.batch, args.text_tokens, config.context_dim),
        "pooled": (args.batch, config.pooled_dim),
        "velocity_target": (args.batch, config.out_channels or config.in_channels, height, width),
    }
    batch = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    batch["t"] = torch.rand(args.batch, generator=generator)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def velocity_functions(ours: Optional[MMDiT], reference: Optional[torch.nn.Module]) -> dict[str, Callable]:
    """Each model's velocity for (latents, t, context, pooled), in our calling convention."""

    def diffusers_velocity(latents, t, context, pooled):
        return reference(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=t * TIMESTEP_SCALE, return_dict=False)[0]

    functions: dict[str, Callable] = {}
    if ours is not None:
        functions["ours"] = ours
    if reference is not None:
        functions["diffusers"] = diffusers_velocity
    return functions


def adamw(parameters) -> torch.optim.Optimizer:
    # Fused is torch's fastest AdamW on CPU and CUDA; foreach where a build lacks it.
    try:
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE, foreach=True)


def autocast_for(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def training_step(velocity: Callable, optimizer: torch.optim.Optimizer, batch: dict, autocast) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        prediction = velocity(batch["latents"], batch["t"], batch["context"], batch["pooled"])
    loss = F.mse_loss(prediction.float(), batch["velocity_target"])
    loss.backward()
    optimizer.step()


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, timed: int, round_steps: int,
                     synchronize: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds of each of `timed` steps per name, run in alternating rounds after `warmup` untimed ones.
    With one name, simply its `timed` steps after `warmup`."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize()
    gc.collect()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    round_index = 0
    while any(len(seconds[name]) < timed for name in names):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(min(round_steps, timed - len(seconds[name]))):
                start = time.perf_counter()
                steps[name]()
                synchronize()
                seconds[name].append(time.perf_counter() - start)
        round_index += 1
    return seconds


def build_ours(config: ModelConfig, device: torch.device, compile_model: bool) -> MMDiT:
    """Our MM-DiT for `config`, initialised on `device` (a 2B-parameter init on the CPU takes a while)."""
    torch.manual_seed(SEED)
    with torch.device(device):
        model = MMDiT.from_config(config)
    model.train()
    return compile_blocks(model) if compile_model else model


def run_bare(name: str, config: ModelConfig, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds per timed step of one model alone: `name` "bare" (ours) or "diffusers"."""
    ours = build_ours(config, device, compile_model=args.compile and name == "bare")
    if name == "diffusers":
        model = build_reference(config, ours).train()
        del ours  # only one model resident
        velocity = velocity_functions(None, model)["diffusers"]
    else:
        model = ours
        velocity = ours
    batch = make_batch(config, args, device)
    optimizer = adamw(model.parameters())
    autocast = autocast_for(args.dtype, device)
    step = lambda: training_step(velocity, optimizer, batch, autocast)  # noqa: E731
    return time_interleaved({name: step}, args.warmup, args.steps, 1, synchronizer(device))[name]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): the CUDA allocator's peak on a GPU, else this process's maximum RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def timing_result(seconds: list[float], batch: int, flops: int, peak: Optional[float]) -> dict:
    """Median and min ms/step, samples/s, achieved TFLOP/s and MFU (None without a peak)."""
    median = statistics.median(seconds)
    return {
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(seconds),
        "samples_per_s": batch / median,
        "achieved_tflops": flops / median / 1e12,
        "mfu": flops / median / (peak * 1e12) if peak else None,
    }
