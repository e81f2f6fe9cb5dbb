"""Splitting shards among independent tasks (SLURM array jobs), shared by the curation tools.

    task_index, num_tasks = resolve_task(args.task_index, args.num_tasks)   # flags, else SLURM_ARRAY_*
    mine = assigned(urls, task_index, num_tasks)                             # shard i -> task i % N
    name = output_name(url)                                                  # "00001.tar" for any url form

`resolve_task` defaults to `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`
of `SLURM_ARRAY_TASK_COUNT` tasks (0 of 1 outside an array), so `sbatch --array=0-63` needs no flags.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Optional

from sd3train.data.shard_names import ShardNameError, shard_file_name


class UsageError(Exception):
    """A problem with the command line, the config or the output folder: exit status 2."""


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer") from None


def resolve_task(
    task_index: int | None, num_tasks: int | None, environ: Mapping[str, str] = os.environ
) -> tuple[int, int]:
    """(task index, number of tasks): the flags, else the Slurm array variables, else (0, 1)."""
    if num_tasks is None:
        num_tasks = _env_int(environ, "SLURM_ARRAY_TASK_COUNT") or 1
    if task_index is None:
        task_id = _env_int(environ, "SLURM_ARRAY_TASK_ID")
        if task_id is None:
            task_index = 0
        else:
            first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0
            step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
            task_index = (task_id - first) // step
    if num_tasks < 1:
        raise UsageError(f"--num-tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise UsageError(f"task index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks}); "
                         "set --task-index, or check SLURM_ARRAY_TASK_ID/_MIN/_COUNT")
    return task_index, num_tasks


def assigned(urls: list[str], task_index: int, num_tasks: int) -> list[str]:
    return [url for index, url in enumerate(urls) if index % num_tasks == task_index]


def output_name(url: str) -> str:
    """The output file's name for a source shard url (`shard_file_name`); a url that names no tar is a
    usage error (exit status 2)."""
    try:
        return shard_file_name(url)
    except ShardNameError as error:
        raise UsageError(str(error)) from None


def pick_device(requested: str) -> str:
    """`--device auto|cpu|cuda` as a torch device name; UsageError for cuda without one."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return requested


def note_problem(result, problem, keep_truncated: bool = False) -> None:
    """Count a tar reader ShardProblem on a shard result (anything with `skip(reason, key, detail)`
    and `failure`): an unreadable shard, or a truncated one unless `keep_truncated`, fails the shard,
    so nothing is published for it and a rerun retries it."""
    from sd3train.data.skips import TRUNCATED_SHARD, UNREADABLE_SHARD

    result.skip(problem.reason, problem.key, problem.detail)
    if problem.reason == UNREADABLE_SHARD or (problem.reason == TRUNCATED_SHARD and not keep_truncated):
        result.failure = f"{problem.reason}: {problem.detail}"


def format_counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counter.items()))


class ShardTally:
    """What one task did with its shards, logged as it goes: a line per shard, the skipped samples
    by reason (with an example each), the shards that failed, and a closing summary.

        tally = ShardTally(log, total=len(todo), unit="captions")
        tally.restart_clock()                       # after loading models: rates leave that out
        tally.add(name, url, count, result.skipped, result.examples, result.failure, seconds)
        return tally.finish(already_done=len(mine) - len(todo), written="table(s)")   # the exit status
    """

    FAILED_SHARDS_EXIT_CODE = 1

    def __init__(self, log: Callable[[str], None], total: int, unit: str, rate_digits: int = 1):
        self.log, self.total, self.unit, self.rate_digits = log, total, unit, rate_digits
        self.count = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.failed: list[str] = []
        self._added = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self._start = time.perf_counter()

    def _rate(self, count: int, seconds: float) -> str:
        return f"{count / max(seconds, 1e-9):.{self.rate_digits}f} {self.unit}/s"

    def add(self, name: str, url: str, count: int, skipped: Mapping[str, int], examples: Mapping[str, str],
            failure: Optional[str], seconds: float) -> bool:
        """Record one shard; False (and it is logged as failed) when it could not be read."""
        self._added += 1
        self.skipped.update(skipped)
        for reason, example in examples.items():
            self.examples.setdefault(reason, example)
        where = f"[{self._added}/{self.total}] {name}"
        if failure is not None:
            self.failed.append(url)
            self.log(f"{where}: FAILED, cannot read {url}: {failure}")
            return False
        self.count += count
        skips = f", skipped {sum(skipped.values())} ({format_counts(skipped)})" if skipped else ""
        self.log(f"{where}: {count} {self.unit}{skips} in {seconds:.1f} s ({self._rate(count, seconds)})")
        return True

    def finish(self, already_done: int, written: str = "shard(s)", prefix: str = "") -> int:
        """Log the summary; the exit status: 0, or 1 when some shards failed (a rerun retries them)."""
        seconds = time.perf_counter() - self._start
        if self.skipped:
            self.log("skipped samples: " + format_counts(self.skipped) + "; e.g. "
                     + "; ".join(f"{reason}: {example}" for reason, example in sorted(self.examples.items())))
        self.log(f"{prefix}done: {self._added - len(self.failed)} {written} written, {already_done} skipped (already "
                 f"there), {len(self.failed)} failed; {self.count} {self.unit} in {seconds:.1f} s "
                 f"({self._rate(self.count, seconds)})")
        if self.failed:
            self.log(f"{len(self.failed)} shard(s) could not be read (nothing written for them); rerun to retry")
            return self.FAILED_SHARDS_EXIT_CODE
        return 0
