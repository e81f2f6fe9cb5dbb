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


def sigkill_while_feeding_fifo(command: list[str], log: Path, fifo: Path, data: bytes, ready, ready_what: str,
                               fed=None, fed_what: str = "", settle_s: float = 0.0) -> None:
    """Run `command` (output to `log`); once `ready()`, write `data` into the FIFO `fifo` it reads,
    wait until `fed()` (and `settle_s`), then SIGKILL it. The kill tests of the curation tools use
    it to stop a tool at a known point inside a shard."""
    import time

    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    writer = None
    try:
        wait_until(ready, ready_what, process, log)
        writer = open_fifo_writer(fifo, process, log)
        os.write(writer, data)
        if fed is not None:
            wait_until(fed, fed_what, process, log)
        time.sleep(settle_s)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if writer is not None:
            os.close(writer)


def assert_export_holds_the_ema(run_dir: Path, out: Path) -> None:
    """`sd3train-export format=single_file` of the run's last checkpoint succeeds, and the file holds
    the EMA weights the checkpoint consolidates to (spot-checked on one tensor)."""
    import torch
    from safetensors.torch import load_file

    from sd3train.checkpoint.files import read_lightning_checkpoint

    result = subprocess.run([str(BIN / "sd3train-export"), f"checkpoint={run_dir / 'checkpoints' / 'last'}",
                             "format=single_file", f"out={out}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(out)
    consolidated = read_lightning_checkpoint(run_dir / "checkpoints" / "last")["state_dict"]
    name = "model.diffusion_model.x_embedder.proj.weight"
    assert name in exported
    torch.testing.assert_close(exported[name].float(), consolidated["ema.shadow.x_embedder.proj.weight"].float())


def train_under_fsdp_and_ddp(root: Path, args: list[str]) -> dict[str, tuple[list[float], dict]]:
    """Two 2-rank `sd3train-train experiment=tiny_cpu` runs with `args`, one under fsdp and one under
    ddp, each in its own folder under `root`: {strategy: (its per-step train/loss, its last checkpoint's
    state dict)}."""
    import csv

    from sd3train.checkpoint.files import read_lightning_checkpoint

    results = {}
    for strategy in ("fsdp", "ddp"):
        cwd = root / strategy
        cwd.mkdir()
        finish(launch([str(BIN / "sd3train-train"), "experiment=tiny_cpu", f"strategy={strategy}", "trainer.devices=2",
                       *args], cwd))
        run_dir = cwd / "runs" / "tiny_cpu" / "main"
        with open(run_dir / "metrics.csv", newline="") as handle:
            losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
        results[strategy] = (losses, read_lightning_checkpoint(run_dir / "checkpoints" / "last")["state_dict"])
    return results
