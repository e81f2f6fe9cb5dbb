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


def wait_until(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    """Poll `condition` until true; fail (with the end of `log`) if `process` exits or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.poll() is not None else "timed out"
            raise AssertionError(f"waiting for {what}: {Path(process.args[0]).name} {state}\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def open_fifo_writer(path: Path, process: subprocess.Popen, log: Path) -> int:
    """The write end of the FIFO at `path`, once `process` has opened it for reading (the kill
    tests feed a shard through one, so they know how far the process has read)."""
    descriptor: list[int] = []

    def opened() -> bool:
        try:
            descriptor.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError:  # ENXIO: no reader yet
            return False

    wait_until(opened, f"the reader of {path.name}", process, log)
    os.set_blocking(descriptor[0], True)
    return descriptor[0]
