"""The GPU check: SD3-Medium's training step (depth 24, 512^2, bf16) on one GPU, every variant of
`python -m sd3train.bench.train_step`, in about 5 minutes; writes DIR/table.md and DIR/results.json.

    python -m sd3train.bench.gpu --out DIR            # on a machine with one CUDA GPU

Runs, in this order (each variant in its own process, only one model resident):
    batch 8                         diffusers, bare, step
    batch 8, --compile              step, bare
    batch 16, selective checkpoints diffusers, step, bare
    batch 16, selective, --compile  step, bare
diffusers is never compiled and checkpoints only under full checkpointing (sd3train/bench/step_loops.py
defines the baseline); the ratio of a compiled row is to the diffusers row of its batch. Each
variant gets what is left of `--budget-s` (default 290) and is skipped, saying so, once less than
20 s are left; the table and the JSON are rewritten after every variant, so a run cut short still
leaves what it measured. Without CUDA it exits with status 2 and says so.

The packages it imports beyond torch, lightning and transformers: hydra-core, omegaconf,
antlr4-python3-runtime and braceexpand (the config and data layers), and diffusers with
importlib_metadata (the baseline). A machine without them gets them as wheels, e.g.
`pip install --no-index --no-deps --target /tmp/site wheels/*.whl && PYTHONPATH=/tmp/site python3
-m sd3train.bench.gpu --out DIR` (the variant subprocesses keep PYTHONPATH). A variant that fails
records its error in both files and the run goes on.
Tests: `python -m pytest tests/unit/bench/test_gpu.py -q`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from sd3train.bench import train_step

PROG = "python -m sd3train.bench.gpu"
NO_CUDA = f"{PROG}: torch sees no CUDA device; this check needs one GPU (nothing was run)"
COMMON = ["--model", "sd3_medium", "--resolution", "512", "--dtype", "bf16", "--device", "cuda",
          "--warmup", "3", "--steps", "10"]
# (name, batch, further train_step arguments, variants in the order run)
RUNS: tuple[tuple[str, int, list[str], list[str]], ...] = (
    ("batch 8", 8, [], ["diffusers", "bare", "step"]),
    ("batch 8, compiled", 8, ["--compile"], ["step", "bare"]),
    ("batch 16, selective", 16, ["--activation-checkpointing", "selective"], ["diffusers", "step", "bare"]),
    ("batch 16, selective, compiled", 16, ["--activation-checkpointing", "selective", "--compile"], ["step", "bare"]),
)
MIN_SECONDS_LEFT = 20.0


def run_variant(arguments: list[str]) -> dict:
    """train_step's result for `arguments` (one subprocess variant), without printing it."""
    return train_step.run(train_step.parse_args(arguments))


def measure(out: Path, budget_s: float, runner: Callable[[list[str]], dict] = run_variant,
            clock: Callable[[], float] = time.monotonic) -> dict:
    """Every run of RUNS within `budget_s` seconds; the results, also written under `out`."""
    started = clock()
    results: dict = {"device": None, "budget_s": budget_s, "command": " ".join([PROG, "--out", str(out)]),
                     "rows": []}
    for run_name, batch, extra, variants in RUNS:
        arguments = [*COMMON, "--batch", str(batch), *extra]
        for variant in variants:
            left = budget_s - (clock() - started)
            row = {"run": run_name, "batch": batch, "variant": variant, "arguments": arguments}
            if left < MIN_SECONDS_LEFT:
                row["skipped"] = f"time budget: {left:.0f} s left of {budget_s:g} s"
            else:
                try:
                    result = runner([*arguments, "--variants", variant, "--variant-timeout", f"{left:.0f}"])
                except Exception as error:  # noqa: BLE001  (unattended: record it, go on with the next)
                    row["error"] = f"{type(error).__name__}: {error}"
                else:
                    results["device"] = results["device"] or result.get("device")
                    results.setdefault("torch_version", result.get("torch_version"))
                    results.setdefault("training_flops_per_step", {})[run_name] = result["training_flops_per_step"]
                    row.update(result["variants"][variant])
            results["rows"].append(row)
            write_outputs(out, results)
    results["seconds"] = clock() - started
    write_outputs(out, results)
    return results


def _diffusers_ms(rows: list[dict], batch: int) -> Optional[float]:
    for row in rows:
        if row["variant"] == "diffusers" and row["batch"] == batch and "median_ms" in row:
            return row["median_ms"]
    return None


def table(results: dict) -> str:
    """The Markdown table of `results` (measure's)."""
    lines = [
        f"SD3-Medium (depth 24) training step, 512^2, bf16 autocast, 154 text tokens; device: {results['device']}, "
        f"torch {results.get('torch_version')}. Median of 10 steps after 3 warm-up; MFU against the dense "
        "bf16 peak; peak memory from torch.cuda.max_memory_allocated.",
        "",
        "| run | variant | ms/step | samples/s | TFLOP/s | MFU | peak GB | diffusers / it |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        if "median_ms" not in row:
            why = row.get("skipped") or ((row.get("error") or "").strip().splitlines() or ["failed"])[-1]
            lines.append(f"| {row['run']} | {row['variant']} | {why.replace('|', '/')} | | | | | |")
            continue
        baseline = _diffusers_ms(results["rows"], row["batch"])
        ratio = f"{baseline / row['median_ms']:.2f}" if baseline else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
        lines.append(f"| {row['run']} | {row['variant']} | {row['median_ms']:.1f} | {row['samples_per_s']:.2f} | "
                     f"{row['achieved_tflops']:.1f} | {mfu} | {row['peak_memory_bytes'] / 1e9:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for table.md and results.json")
    parser.add_argument("--budget-s", type=float, default=290.0, help="seconds for all variants together")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    results = measure(args.out, args.budget_s)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
