"""Time training steps of our MM-DiT against diffusers' `SD3Transformer2DModel` built from the same
config, with the same batch and precision; report median ms/step, TFLOP/s, MFU and the ratio to diffusers.

Two ways, combinable (`--variants`):
  interleaved   (default) both bare loops in one process (forward, MSE loss, backward, fused
                AdamW; sd3train/bench/step_loops.py), timed steps alternating between the models
                in rounds of `--round-steps`, the first model swapping every round, so machine
                noise falls on both alike. Same weights in both.
  diffusers     the diffusers baseline alone (defined in sd3train/bench/step_loops.py:
                SD3Transformer2DModel, its default attention processor, same config and batch,
                bf16 autocast over fp32 weights under --dtype bf16, fused AdamW)
  bare          our MM-DiT alone in the same bare loop
  step          the project's own training step: SD3LitModule under a real Lightning Trainer on
                fixed precompute-cache batches, optimizer, guard, EMA, clipping and logging
                included (sd3train/bench/step_variant.py)
Each of diffusers, bare and step runs in its own subprocess, so only one model is resident, and
reports its peak memory (torch.cuda.max_memory_allocated on a GPU, the process's max RSS on a CPU)
and its ratio to the diffusers variant (diffusers ms / its ms: above 1 it is faster).

    # the embedded tiny CPU model as `make train` trains it (conf/experiment/tiny_cpu.yaml: 64^2,
    # batch 32, 16 CLIP + 16 T5 tokens, fp32)
    python -m sd3train.bench.train_step --model tiny --resolution 64 --batch 32 --text-tokens 32 \\
        --device cpu --dtype fp32 --threads 1 --warmup 10 --steps 100
    # the README's CPU command: depth 4 (SD3 text widths, rms qk norm), 256^2, batch 8, every variant
    python -m sd3train.bench.train_step --model mmdit --depth 4 --resolution 256 --batch 8 \\
        --device cpu --dtype bf16 --threads 1 --warmup 3 --steps 20 --compile \\
        --variants interleaved diffusers bare step --json /tmp/cpu.json
    # SD3-Medium size (depth 24, no qk norm) at 512^2 in bf16 on a GPU, with MFU
    python -m sd3train.bench.train_step --model sd3_medium --resolution 512 --batch 8 \\
        --device cuda --dtype bf16 --warmup 5 --steps 30 --compile --variants diffusers bare step

`--model` names a conf/model/*.yaml; `--depth`, `--hidden`, `--heads`, `--qk-norm`,
`--dual-attention-layers`, `--activation-checkpointing` (none|full|selective|every_k; alone: full),
`--attention-backend` and `--compile` override it (the last three are our model's
model.activation_checkpointing, model.attention_backend and model.compile; diffusers gets its own
full checkpointing only with full, and is never compiled). Latents are resolution / 8 on a side.
FLOPs are the analytic count of `sd3train.model.flops` (training = 3x forward, attention
included; recomputation not counted); MFU needs a GPU in sd3train/runtime/peak.py or --peak-tflops.
On a shared 2-core machine use `--threads 1`: with two threads the medians of repeated runs
differed by 10% and more. `--json` prints one JSON object instead of the table; `--json OUT` writes it to OUT.

diffusers is a test-only dependency (`pip install -e '.[test]'`); only this benchmark imports it.
Tests: `python -m pytest tests/unit/bench -q`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from sd3train.bench.step_loops import (
    LATENT_DOWNSAMPLE,
    MISSING_DIFFUSERS,
    SEED,
    adamw,
    autocast_for,
    build_reference,
    make_batch,
    peak_memory,
    run_bare,
    synchronizer,
    time_interleaved,
    timing_result,
    training_step,
    velocity_functions,
)
from sd3train.config.compose import group_option
from sd3train.config.schema import ModelConfig
from sd3train.config.typed import ConfigError, build_typed
from sd3train.model.activation_checkpointing import ACTIVATION_CHECKPOINTING
from sd3train.model.attention import ATTENTION_BACKENDS
from sd3train.model.compile import compile_blocks
from sd3train.model.flops import training_step_flops
from sd3train.model.mmdit import MMDiT
from sd3train.paths import REPO_ROOT
from sd3train.runtime.peak import peak_tflops

PROG = "python -m sd3train.bench.train_step"
MODEL_NAMES = ("ours", "diffusers")
VARIANTS = ("interleaved", "diffusers", "bare", "step")
SUBPROCESS_VARIANTS = ("diffusers", "bare", "step")


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
    parser.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                        choices=ACTIVATION_CHECKPOINTING, help="model.activation_checkpointing (alone: full)")
    parser.add_argument("--attention-backend", default="auto", choices=tuple(ATTENTION_BACKENDS),
                        help="model.attention_backend of our model")
    parser.add_argument("--compile", action="store_true", help="compile our joint blocks (model.compile=true)")
    parser.add_argument("--resolution", default="512", help="image pixels, N or HxW (latents are 1/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=154, help="context length (SD3: 77 CLIP + 77 T5)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--round-steps", type=int, default=1, help="interleaved: steps per model in one round")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: a table of known GPUs)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["interleaved"],
                        help="what to time (default: interleaved)")
    parser.add_argument("--variant-timeout", type=float, default=600.0, help="seconds per subprocess variant")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="alone: print one JSON object instead of the table; with OUT: write it to OUT")
    # Internal: run one variant in this process and write its result to --worker-out.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    problems = [f"--{name.replace('_', '-')} must be >= {low}" for name, low in
                (("batch", 1), ("text_tokens", 1), ("steps", 1), ("warmup", 0), ("round_steps", 1))
                if getattr(args, name) < low]
    if "step" in args.variants and args.text_tokens < 2:
        problems.append("--text-tokens must be >= 2 for the step variant (CLIP and T5 tokens)")
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
    data.update(activation_checkpointing=args.activation_checkpointing, attention_backend=args.attention_backend,
                compile=bool(args.compile))
    config, problems = build_typed(ModelConfig, data, prefix="model.")
    if problems:
        raise ConfigError(problems)
    return config


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


def run_interleaved(config: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per timed step of ours and diffusers, both resident, alternating."""
    torch.manual_seed(SEED)
    ours = MMDiT.from_config(config)
    reference = build_reference(config, ours)
    ours.to(device).train()
    reference.to(device).train()
    if args.compile:
        compile_blocks(ours)
    batch = make_batch(config, args, device)
    autocast = autocast_for(args.dtype, device)
    optimizers = {"ours": adamw(ours.parameters()), "diffusers": adamw(reference.parameters())}
    steps = {name: (lambda velocity=velocity, name=name: training_step(velocity, optimizers[name], batch, autocast))
             for name, velocity in velocity_functions(ours, reference).items()}
    return time_interleaved(steps, args.warmup, args.steps, args.round_steps, synchronizer(device))


def run_worker(args: argparse.Namespace) -> dict:
    """One variant, in this process (a subprocess of the benchmark): its seconds per step and peak memory."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = model_config(args)
    if args.worker == "interleaved":
        seconds = run_interleaved(config, args, device)
    elif args.worker == "step":
        from sd3train.bench.step_variant import run_step  # Lightning and the whole module: only here

        seconds = run_step(config, args, device)
    else:
        seconds = run_bare(args.worker, config, args, device)
    memory, memory_kind = peak_memory(device)
    return {"seconds": seconds, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind}


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    """Variant `name` run by a fresh Python process (`--worker`): run_worker's result, or {"error": ...}."""
    forwarded = _without_options(args.argv, ("--variants", "--json", "--worker", "--worker-out"))
    with tempfile.TemporaryDirectory(prefix="sd3train-bench-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "sd3train.bench.train_step", *forwarded, "--variants", name,
                   "--worker", name, "--worker-out", str(out)]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=args.variant_timeout,
                                       cwd=REPO_ROOT, env=_child_environment())
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.variant_timeout:g} s"}
        if completed.returncode != 0 or not out.is_file():
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-12:]
            return {"error": f"exit status {completed.returncode}: " + "\n".join(tail)}
        return json.loads(out.read_text())


def _child_environment() -> dict[str, str]:
    # The repository first on the path (it may not be installed), whatever else was there kept
    # (a GPU machine's carried packages, say).
    path = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path}


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` without the options `names` and their values (everything up to the next option)."""
    kept, skipping = [], False
    for item in argv:
        if item.startswith("--"):
            skipping = item.split("=", 1)[0] in names
        if not skipping:
            kept.append(item)
    return kept


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _adamw_kind(device: torch.device) -> str:
    if device.type == "cuda":  # torch has fused AdamW on CUDA; no tensor here, so no CUDA context
        return "fused"
    probe = adamw([torch.zeros(1, requires_grad=True)])
    return "fused" if probe.defaults.get("fused") else "foreach"


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = model_config(args)
    latent_h, latent_w = (side // LATENT_DOWNSAMPLE for side in args.image_size)
    flops = training_step_flops(config, args.batch, latent_h, latent_w, args.text_tokens)
    peak, peak_source = peak_for(args, device)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in MMDiT.from_config(config).parameters())
    result = {
        "model": {**dataclasses.asdict(config), "name": args.model, "parameters": parameters},
        "resolution": list(args.image_size), "latent": [latent_h, latent_w], "batch": args.batch,
        "text_tokens": args.text_tokens, "dtype": args.dtype, "bf16_mode": "autocast, fp32 weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "diffusers_version": _version("diffusers"), "optimizer": "AdamW " + _adamw_kind(device),
        "compile": bool(args.compile), "attention_backend": args.attention_backend,
        "activation_checkpointing": args.activation_checkpointing,
        "warmup": args.warmup, "steps": args.steps, "round_steps": args.round_steps,
        "training_flops_per_step": flops, "peak_tflops": peak, "peak_source": peak_source,
    }
    if "interleaved" in args.variants:
        if set(args.variants) == {"interleaved"}:
            seconds = run_interleaved(config, args, device)
        else:  # with other variants: in its own process too, so each starts alike
            seconds = run_in_subprocess("interleaved", args).get("seconds") or {}
        if seconds:
            for name in MODEL_NAMES:
                result[name] = timing_result(seconds[name], args.batch, flops, peak)
            result["ratio_diffusers_over_ours"] = result["diffusers"]["median_ms"] / result["ours"]["median_ms"]
        else:
            result["interleaved_error"] = "the interleaved subprocess failed (run it alone to see why)"
    variants = {}
    for name in (name for name in SUBPROCESS_VARIANTS if name in args.variants):
        outcome = run_in_subprocess(name, args)
        if "error" in outcome:
            variants[name] = {"error": outcome["error"]}
            continue
        variants[name] = {**timing_result(outcome["seconds"], args.batch, flops, peak),
                          "peak_memory_bytes": outcome["peak_memory_bytes"],
                          "peak_memory_kind": outcome["peak_memory_kind"]}
    baseline = variants.get("diffusers", {}).get("median_ms")
    for row in variants.values():
        if "median_ms" in row:
            row["ratio_to_diffusers"] = baseline / row["median_ms"] if baseline else None
    if variants:
        result["variants"] = variants
    return result


def _timing_line(name: str, row: dict, extra: str = "") -> str:
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
    return (f"{name:12} {row['median_ms']:15.2f} {row['min_ms']:12.2f} {row['samples_per_s']:10.2f} "
            f"{row['achieved_tflops']:9.4f} {mfu:>7}{extra}")


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
        f"ours: compile {result['compile']}, attention {result['attention_backend']}, "
        f"activation checkpointing {result['activation_checkpointing']}",
        f"device {result['device']}, threads {result['threads']}, torch {result['torch_version']}, "
        f"diffusers {result['diffusers_version']}; {result['steps']} timed steps each after {result['warmup']} warm-up",
        f"analytic training FLOPs per step: {result['training_flops_per_step'] / 1e9:.3f} GFLOP "
        f"(peak: {result['peak_source']})",
    ]
    header = f"{'':12} {'median ms/step':>15} {'min ms/step':>12} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7}"
    if "ours" in result:
        lines += ["", "interleaved, both models in one process:", header]
        lines += [_timing_line(name, result[name]) for name in MODEL_NAMES]
        lines.append(f"ratio diffusers / ours: {result['ratio_diffusers_over_ours']:.3f} (above 1: ours is faster)")
    elif "interleaved_error" in result:
        lines += ["", f"interleaved: {result['interleaved_error']}"]
    if "variants" in result:
        lines += ["", "each in its own process:", f"{header} {'peak GB':>8} {'diffusers / it':>15}"]
        for name, row in result["variants"].items():
            if "error" in row:
                lines.append(f"{name:12} failed: {row['error']}")
                continue
            ratio = f"{row['ratio_to_diffusers']:.3f}" if row["ratio_to_diffusers"] is not None else "-"
            lines.append(_timing_line(name, row, f" {row['peak_memory_bytes'] / 1e9:8.2f} {ratio:>15}"))
        kinds = {row["peak_memory_kind"] for row in result["variants"].values() if "peak_memory_kind" in row}
        lines.append(f"peak memory: {', '.join(sorted(kinds))}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        if args.worker is not None:
            outcome = run_worker(args)
            Path(args.worker_out).write_text(json.dumps(outcome))
            return outcome
        result = run(args)
    except (ConfigError, ModuleNotFoundError, ValueError) as error:
        if isinstance(error, ModuleNotFoundError) and str(error) != MISSING_DIFFUSERS:
            raise
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(2)
    if args.json not in (None, "-"):
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json == "-" else report(result))
    return result


if __name__ == "__main__":
    main()
