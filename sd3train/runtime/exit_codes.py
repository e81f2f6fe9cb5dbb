"""sd3train-train's exit statuses (README, "Exit statuses"), one place for the entry point, the
callbacks that raise the failures behind them, and the tests."""

FINISHED = 0
CONFIG_EXIT_CODE = 2  # the config is invalid: every problem listed, before anything is built
NONFINITE_EXIT_CODE = 3  # too many non-finite steps in a row (sd3train/lit/nonfinite.py)
OOM_EXIT_CODE = 4  # out of memory; no checkpoint of the failed step exists
DATA_BUDGET_EXIT_CODE = 5  # the data's bad-sample budget was exceeded (sd3train/data/skips.py)
# Stopped for preemption with a checkpoint, but not requeued (no SLURM, or scontrol refused): run
# the same command again to continue.
PREEMPTED_EXIT_CODE = 6
