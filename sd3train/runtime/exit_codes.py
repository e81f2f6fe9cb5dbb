"""sd3train-train's exit statuses (README, "Exit statuses"), one place for the entry point, the
callbacks that raise the failures behind them, and the tests."""

import os

FINISHED = 0
CONFIG_EXIT_CODE = 2  # the config is invalid: every problem listed, before anything is built
NONFINITE_EXIT_CODE = 3  # too many non-finite steps in a row (sd3train/lit/nonfinite.py)
OOM_EXIT_CODE = 4  # out of memory; no checkpoint of the failed step exists
DATA_BUDGET_EXIT_CODE = 5  # the data's bad-sample budget was exceeded (sd3train/data/skips.py)
# Stopped for preemption with a checkpoint, but not requeued (no SLURM, or scontrol refused): run
# the same command again to continue.
PREEMPTED_EXIT_CODE = 6


def out_of_memory_report(error: BaseException) -> str:
    """What sd3train-train says when a rank ran out of memory: the error, the CUDA memory summary,
    and what to change."""
    import torch

    rank = os.environ.get("RANK", "0")
    summary = torch.cuda.memory_summary(abbreviated=True) if torch.cuda.is_available() else "(no CUDA device)"
    return (f"out of memory on rank {rank}: {str(error).splitlines()[0]}\n{summary}\n"
            "No checkpoint was written for the failed step; lower data.batch_size, set "
            "model.activation_checkpointing=selective|full, or shard more (strategy=zero2|zero3).")
