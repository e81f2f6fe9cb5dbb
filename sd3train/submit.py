"""sd3train-submit: submit training, or a curation tool as an array job, to SLURM from the
launch/slurm/ templates.

    sd3train-submit --nodes 4 --gpus-per-node 8 experiment=finetune_sd35_medium trainer.max_steps=20000
    sd3train-submit --dry-run --nodes 4 --gpus-per-node 8 experiment=tiny_cpu     # print the script only
    sd3train-submit --tool precompute --array 0-63 --gpus-per-node 1 -- --out /data/cache experiment=...

Training (launch/slurm/train.sbatch): the flags become the #SBATCH lines (one task per GPU:
--ntasks-per-node equals --gpus-per-node; --requeue, --open-mode=append and --signal=USR1@<lead>
always); every other argument is a Hydra override passed through verbatim to `sd3train-train`.

Curation (--tool precompute|dedup|caption, launch/slurm/curate.sbatch): an array job of one task
per array index (--array, SLURM's syntax: 0-63, 0-63%16), each running `sd3train-<tool>` on its
share of the shards; arguments after `--` go to the tool verbatim (flags included).

The script is written to runs/submit/<job name>-<time>.sbatch and handed to `sbatch`; --dry-run
prints it instead. Its default environment is the one sd3train-submit runs from (SD3TRAIN_VENV
in the job's environment overrides it). `--gpus-per-node 0` submits CPU tasks (one per --tasks-per-node), as the tests do.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from sd3train.paths import REPO_ROOT

PROG = "sd3train-submit"
TEMPLATE = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
CURATE_TEMPLATE = REPO_ROOT / "launch" / "slurm" / "curate.sbatch"
TOOLS = ("train", "precompute", "dedup", "caption")
_TOOL_LINE = re.compile(r"^TOOL=\S+$")
# One range (with an optional step and %limit): the tools number tasks from SLURM_ARRAY_TASK_MIN,
# _STEP and _COUNT, which a list such as 0,4,8 does not describe.
_ARRAY = re.compile(r"^\d+(-\d+(:\d+)?)?(%\d+)?$")
USAGE_EXIT_CODE = 2
_SBATCH_LINE = re.compile(r"^#SBATCH\s")
_OVERRIDES_LINE = 'OVERRIDES=("$@")'
_VENV_DEFAULT = '"${SD3TRAIN_VENV:-.venv}/bin/activate"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one srun task per GPU (0: CPU tasks)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="tasks per node when --gpus-per-node is 0 (default 1)")
    parser.add_argument("--cpus-per-task", type=int, default=12)
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 512G")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--job-name", default=None, help="default: sd3train, or sd3-<tool> for a curation tool")
    parser.add_argument("--tool", choices=TOOLS, default="train",
                        help="what the job runs: training (default) or a curation tool as an array job")
    parser.add_argument("--array", default=None, metavar="SPEC",
                        help="array indices of a curation job, SLURM's syntax (0-63, 0-63%%16); required with --tool")
    parser.add_argument("--signal-lead", type=int, default=180,
                        help="seconds before the time limit at which the tasks get USR1 (default 180)")
    parser.add_argument("--output", default=None,
                        help="SLURM output file pattern (default slurm-%%x-%%j.out; arrays slurm-%%x-%%A_%%a.out)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="an extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("--template", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _fill_defaults(args: argparse.Namespace) -> None:
    curating = args.tool != "train"
    if args.job_name is None:
        args.job_name = f"sd3-{args.tool}" if curating else "sd3train"
    if args.output is None:
        args.output = "slurm-%x-%A_%a.out" if curating else "slurm-%x-%j.out"
    if args.template is None:
        args.template = CURATE_TEMPLATE if curating else TEMPLATE


def sbatch_lines(args: argparse.Namespace) -> list[str]:
    tasks = args.gpus_per_node if args.gpus_per_node > 0 else (args.tasks_per_node or 1)
    options = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks}",
        *([f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node > 0 else []),
        f"--cpus-per-task={args.cpus_per_task}",
        *([f"--mem={args.mem}"] if args.mem else []),
        f"--time={args.time}",
        *([f"--partition={args.partition}"] if args.partition else []),
        *([f"--account={args.account}"] if args.account else []),
        *([f"--qos={args.qos}"] if args.qos else []),
        "--requeue",
        "--open-mode=append",
        # Training checkpoints on the signal; a curation task redoes at most its current shard.
        *([f"--signal=USR1@{args.signal_lead}"] if args.tool == "train" else [f"--array={args.array}"]),
        f"--output={args.output}",
        *args.sbatch_arg,
    ]
    return [f"#SBATCH {option}" for option in options]


def submitting_venv() -> str | None:
    """The virtual environment sd3train-submit runs from (None outside one): the job's default, so
    a job submitted from any directory finds the same installation."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def _bash_double_quoted(text: str) -> str:
    """`text` safe inside a double-quoted bash word."""
    return "".join("\\" + char if char in '\\"$`' else char for char in text)


def render(template: str, lines: list[str], overrides: list[str], tool: str | None = None,
           venv: str | None = None) -> str:
    """The template with its #SBATCH block replaced by `lines`, the overrides written in, the
    default environment set to `venv` (when given) and, for a curation template, its TOOL= line
    set to `tool`."""
    out: list[str] = []
    placed = False
    for line in template.splitlines():
        if _SBATCH_LINE.match(line):
            if not placed:
                out.extend(lines)
                placed = True
            continue
        if line.strip() == _OVERRIDES_LINE:
            line = "OVERRIDES=(" + " ".join(shlex.quote(arg) for arg in overrides) + ' "$@")'
        if tool is not None and _TOOL_LINE.match(line.strip()):
            line = f"TOOL={tool}"
        if venv is not None and _VENV_DEFAULT in line:
            line = line.replace(_VENV_DEFAULT, f'"${{SD3TRAIN_VENV:-{_bash_double_quoted(venv)}}}/bin/activate"')
        out.append(line)
    if not placed or not any(line.startswith("OVERRIDES=(") for line in out):
        raise ValueError(f"the template has no #SBATCH block or no {_OVERRIDES_LINE} line")
    return "\n".join(out) + "\n"


def _problems(args: argparse.Namespace) -> list[str]:
    problems = [f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
                for name, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_lead", 1))
                if getattr(args, name) < low]
    if args.tasks_per_node is not None and args.gpus_per_node > 0:
        problems.append("--tasks-per-node is only for CPU tasks (--gpus-per-node 0): one task per GPU otherwise")
    if args.tool == "train" and args.array is not None:
        problems.append("--array is for curation tools (--tool precompute|dedup|caption); training is one job")
    if args.tool != "train" and args.array is None:
        problems.append(f"--tool {args.tool} needs --array (e.g. --array 0-63: one task per index)")
    if args.array is not None and not _ARRAY.match(args.array):
        problems.append(f"--array {args.array!r} is not one range of SLURM's array syntax (e.g. 0-63, 0-63%16, "
                        "0-62:2); to redo some tasks, submit the whole range again: finished shards are skipped")
    if not args.template.is_file():
        problems.append(f"template {args.template} does not exist")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # After `--`: the tool's own arguments, flags included, passed on untouched.
    tool_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args, overrides = parser.parse_known_args(argv)
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides are key=value "
                     "(a curation tool's own flags go after --)")
    _fill_defaults(args)
    problems = _problems(args)
    if problems:
        print(f"{PROG}: " + "; ".join(problems), file=sys.stderr)
        return USAGE_EXIT_CODE
    tool = None if args.tool == "train" else args.tool
    script = render(args.template.read_text(), sbatch_lines(args), overrides + tool_args, tool, submitting_venv())
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    folder = Path("runs") / "submit"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    try:
        result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"{PROG}: sbatch not found (is this a SLURM login node?); the script is {path}", file=sys.stderr)
        return USAGE_EXIT_CODE
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
