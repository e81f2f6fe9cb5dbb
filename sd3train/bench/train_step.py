"""Time one training step (forward, loss, backward, AdamW) of our MM-DiT against diffusers'
`SD3Transformer2DModel` built from the same config with the same weights, batch and precision,
in one process. Prints median ms/step and samples/s of each, the ratio diffusers / ours (above 1:
ours is faster) and, on a GPU, model FLOP utilisation from the analytic count in
`sd3train.bench.flops` (training = 3x forward, attention included).

    # the embedded tiny CPU model as `make train` trains it (conf/experiment/tiny_cpu.yaml: 64^2,
    # batch 32, 16 CLIP + 16 T5 tokens, fp32)
    python -m sd3train.bench.train_step --model tiny --resolution 64 --batch 32 --text-tokens 32 \\
        --device cpu --dtype fp32 --threads 1 --warmup 10 --steps 100
    # a bigger CPU config (SD3 text widths, rms qk norm)
    python -m sd3train.bench.train_step --model mmdit --depth 4 --resolution 256 --batch 2 \\
        --device cpu --dtype fp32 --threads 1 --warmup 5 --steps 40
    # SD3-Medium size (depth 24, no qk norm) at 512^2 in bf16 on a GPU, with MFU
    python -m sd3train.bench.train_step --model sd3_medium --resolution 512 --batch 8 \\
        --device cuda --dtype bf16 --warmup 5 --steps 30

`--model` names a conf/model/*.yaml; `--depth`, `--hidden`, `--heads`, `--qk-norm`,
`--dual-attention-layers` and `--activation-checkpointing` override it. Latents are
resolution / 8 on a side (SD3's VAE, and the tiny one, downsample 8x). bf16 is autocast over
fp32 weights for both models, as Lightning's `bf16-mixed` (our default precision) trains.
Both models use the same AdamW (fused where torch has it). Timed steps alternate between the
models, one round of `--round-steps` each with the first model swapping every round, so machine
noise falls on both alike. On a shared 2-core machine use `--threads 1`: with two threads the
medians of repeated runs differed by 10% and more. Add `--json` for one machine-readable JSON object.

diffusers is a test-only dependency (`pip install -e '.[test]'`); only this benchmark imports it.
Tests: `python -m pytest tests/unit/bench -q`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from sd3train.bench.flops import training_step_flops
from sd3train.bench.peak import peak_tflops
from sd3train.checkpoint.export_diffusers import transformer_config
from sd3train.checkpoint.mmdit_diffusers import official_to_diffusers
from sd3train.config.compose import group_option
from sd3train.config.schema import ModelConfig
from sd3train.config.typed import ConfigError, build_typed
from sd3train.model.mmdit import TIMESTEP_SCALE, MMDiT
from sd3train.paths import REPO_ROOT

PROG = "python -m sd3train.bench.train_step"
LATENT_DOWNSAMPLE = 8
MODEL_NAMES = ("ours", "diffusers")
SEED = 0
LEARNING_RATE = 1e-4
MISSING_DIFFUSERS = (
    "the benchmark compares against diffusers' SD3Transformer2DModel, and diffusers is not installed; "
    "install the test extra: pip install -e '.[test]'"
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mmdit", help="a conf/model/*.yaml name (default: mmdit)")
    parser.add_argument("--depth", type=int, help="overrides the model's depth")
    parser.add_argument("--hidden", type=int, help="width (default: the model's, else 64 * depth)")
    parser.add_argument("--heads", type=int, help="attention heads (default: the model's, else depth)")
    parser.add_argument("--qk-norm", choices=("none", "rms"), help="overrides the model's qk norm")
    parser.add_argument("--dual-attention-layers", type=int, nargs="*", metavar="INDEX",
                        help="MMDiT-X layers with the extra image self-attention (overrides the model's)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block in the backward pass (both models)")
    parser.add_argument("--resolution", default="512", help="image pixels, N or HxW (latents are 1/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=154, help="context length (SD3: 77 CLIP + 77 T5)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--round-steps", type=int, default=1, help="steps per model in one timing round")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: a table of known GPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} must be >= {low}" for name, low in
                (("batch", 1), ("text_tokens", 1), ("steps", 1), ("warmup", 0), ("round_steps", 1))
                if getattr(args, name) < low]
    try:
        args.image_size = parse_resolution(args.resolution)
    except ValueError as error:
        problems.append(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: torch sees no CUDA device")
    if problems:
        parser.error("; ".join(problems))
    return args


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' or '512x768' (height x width) -> (height, width) in pixels, each a multiple of 8."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise ValueError(f"--resolution: expected N or HxW, got {text!r}") from None
    if len(parts) > 2 or height <= 0 or width <= 0 or height % LATENT_DOWNSAMPLE or width % LATENT_DOWNSAMPLE:
        raise ValueError(f"--resolution: {text!r} is not N or HxW with positive multiples of {LATENT_DOWNSAMPLE}")
    return height, width


def model_config(args: argparse.Namespace) -> ModelConfig:
    """conf/model/<args.model>.yaml with the command-line overrides, checked against the schema."""
    path = REPO_ROOT / "conf" / "model" / f"{args.model}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError([f"--model: no {path.name} in conf/model (there are: {', '.join(names)})"])
    data = group_option("model", args.model)
    overrides = {"depth": args.depth, "hidden_size": args.hidden, "num_heads": args.heads}
    data.update({key: value for key, value in overrides.items() if value is not None})
    if args.qk_norm is not None:
        data["qk_norm"] = None if args.qk_norm == "none" else args.qk_norm
    if args.dual_attention_layers is not None:
        data["dual_attention_layers"] = list(args.dual_attention_layers)
    data["activation_checkpointing"] = bool(args.activation_checkpointing)
    config, problems = build_typed(ModelConfig, data, prefix="model.")
    if problems:
        raise ConfigError(problems)
    return config


def build_reference(config: ModelConfig, ours: MMDiT) -> torch.nn.Module:
    """diffusers' SD3Transformer2DModel for `config`, holding `ours`'s weights (converted keys)."""
    try:
        import diffusers
    except ImportError as error:
        raise ModuleNotFoundError(MISSING_DIFFUSERS) from error
    settings = {key: value for key, value in transformer_config(config).items() if not key.startswith("_")}
    reference = diffusers.SD3Transformer2DModel.from_config(settings)
    reference.load_state_dict(official_to_diffusers(ours.state_dict(), config.depth), strict=True)
    if config.activation_checkpointing:
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


def velocity_functions(ours: MMDiT, reference: torch.nn.Module) -> dict[str, Callable]:
    """Each model's velocity for (latents, t, context, pooled), in our calling convention."""

    def diffusers_velocity(latents, t, context, pooled):
        return reference(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=t * TIMESTEP_SCALE, return_dict=False)[0]

    return {"ours": ours, "diffusers": diffusers_velocity}


def adamw(parameters) -> torch.optim.Optimizer:
    # Fused is torch's fastest AdamW on CPU and CUDA; foreach where a build lacks it.
    try:
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE, foreach=True)


def training_step(velocity: Callable, optimizer: torch.optim.Optimizer, batch: dict, autocast) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        prediction = velocity(batch["latents"], batch["t"], batch["context"], batch["pooled"])
    loss = F.mse_loss(prediction.float(), batch["velocity_target"])
    loss.backward()
    optimizer.step()


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, timed: int, round_steps: int,
                     synchronize: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds of each of `timed` steps per name, run in alternating rounds after `warmup` untimed ones."""
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


def peak_for(args: argparse.Namespace, device: torch.device) -> tuple[Optional[float], str]:
    """(peak TFLOP/s or None, where it came from)."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "none on CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    precision = args.dtype
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    peak = peak_tflops(name, precision)
    return peak, (f"table: {name}, {precision} dense" if peak else f"{name} is not in the table (pass --peak-tflops)")


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = model_config(args)
    torch.manual_seed(SEED)
    ours = MMDiT.from_config(config)
    reference = build_reference(config, ours)
    ours.to(device).train()
    reference.to(device).train()
    batch = make_batch(config, args, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" \
        else contextlib.nullcontext
    optimizers = {"ours": adamw(ours.parameters()), "diffusers": adamw(reference.parameters())}
    steps = {name: (lambda velocity=velocity, name=name: training_step(velocity, optimizers[name], batch, autocast))
             for name, velocity in velocity_functions(ours, reference).items()}
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds = time_interleaved(steps, args.warmup, args.steps, args.round_steps, synchronize)

    latent_h, latent_w = (side // LATENT_DOWNSAMPLE for side in args.image_size)
    flops = training_step_flops(config, args.batch, latent_h, latent_w, args.text_tokens)
    peak, peak_source = peak_for(args, device)
    result = {
        "model": {**dataclasses.asdict(config), "name": args.model,
                  "parameters": sum(p.numel() for p in ours.parameters())},
        "resolution": list(args.image_size), "latent": [latent_h, latent_w], "batch": args.batch,
        "text_tokens": args.text_tokens, "dtype": args.dtype, "bf16_mode": "autocast, fp32 weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "diffusers_version": importlib.metadata.version("diffusers"),
        "optimizer": "AdamW " + ("fused" if optimizers["ours"].defaults.get("fused") else "foreach"),
        "warmup": args.warmup, "steps": args.steps, "round_steps": args.round_steps,
        "training_flops_per_step": flops, "peak_tflops": peak, "peak_source": peak_source,
    }
    for name in MODEL_NAMES:
        median = statistics.median(seconds[name])
        result[name] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(seconds[name]),
            "samples_per_s": args.batch / median,
            "achieved_tflops": flops / median / 1e12,
            "mfu": flops / median / (peak * 1e12) if peak else None,
        }
    result["ratio_diffusers_over_ours"] = result["diffusers"]["median_ms"] / result["ours"]["median_ms"]
    return result


def report(result: dict) -> str:
    model = result["model"]
    height, width = result["resolution"]
    lines = [
        f"model {model['name']}: depth {model['depth']}, hidden {model['hidden_size'] or 64 * model['depth']}, "
        f"heads {model['num_heads'] or model['depth']}, qk_norm {model['qk_norm']}, "
        f"dual attention {model['dual_attention_layers']}, {model['parameters'] / 1e6:.2f}M parameters",
        f"batch {result['batch']} at {height}x{width} (latents {result['latent'][0]}x{result['latent'][1]}), "
        f"{result['text_tokens']} text tokens, {result['dtype']} "
        f"({result['bf16_mode'] if result['dtype'] == 'bf16' else 'weights and math'}), {result['optimizer']}",
        f"device {result['device']}, threads {result['threads']}, torch {result['torch_version']}, "
        f"diffusers {result['diffusers_version']}; {result['steps']} timed steps each after {result['warmup']} warm-up",
        f"analytic training FLOPs per step: {result['training_flops_per_step'] / 1e9:.3f} GFLOP "
        f"(peak: {result['peak_source']})",
        "",
        f"{'':10} {'median ms/step':>15} {'min ms/step':>12} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7}",
    ]
    for name in MODEL_NAMES:
        row = result[name]
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        lines.append(f"{name:10} {row['median_ms']:15.2f} {row['min_ms']:12.2f} {row['samples_per_s']:10.2f} "
                     f"{row['achieved_tflops']:9.4f} {mfu:>7}")
    lines.append(f"ratio diffusers / ours: {result['ratio_diffusers_over_ours']:.3f} (above 1: ours is faster)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ConfigError, ModuleNotFoundError, ValueError) as error:
        if isinstance(error, ModuleNotFoundError) and str(error) != MISSING_DIFFUSERS:
            raise
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return result


if __name__ == "__main__":
    main()
