"""Console-script runs as child process groups, for the multi-process tests (Lightning starts the
other ranks itself, so a kill or a timeout must reach the whole group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start `args` in its own session (W&B offline), output captured."""
    return subprocess.Popen(args, cwd=cwd, env={**os.environ, "WANDB_MODE": "offline"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the run; kill its group if it hangs; assert it succeeded and return its output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, output[-5000:]
    return output
