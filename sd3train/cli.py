"""Hydra-style `key=value` arguments for the small console scripts (sd3train-sample, sd3train-export).

    args = parse_key_values(argv, prog="sd3train-export", allowed={"checkpoint", "out"}, required={"checkpoint"})

Values are parsed by OmegaConf's override grammar, so `seeds=[0,1]` is a list and `ema=false` a bool.
A usage error prints `prog: message` to stderr and exits with status 2, like argparse.
"""

from __future__ import annotations

import sys
from typing import Iterable, NoReturn

from omegaconf import OmegaConf

USAGE_EXIT_CODE = 2


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def parse_key_values(
    argv: list[str] | None, *, prog: str, allowed: Iterable[str], required: Iterable[str] = ()
) -> dict:
    """`argv` (default: sys.argv[1:]) as a plain dict; unknown or missing keys are usage errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    malformed = [arg for arg in argv if "=" not in arg]
    if malformed:
        fail(prog, f"arguments must be key=value, got {' '.join(malformed)}")
    try:
        args = OmegaConf.to_container(OmegaConf.from_cli(argv))
    except Exception as error:  # OmegaConf's grammar errors are long; the first line names the argument
        fail(prog, f"cannot parse arguments: {str(error).splitlines()[0]}")
    allowed = set(allowed)
    unknown = sorted(set(args) - allowed)
    if unknown:
        fail(prog, f"unknown argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    missing = [key for key in required if key not in args]
    if missing:
        fail(prog, " and ".join(f"{key}=..." for key in missing) + " required")
    return args
