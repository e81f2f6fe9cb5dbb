"""sd3train-precompute: encode image shards once into a cache of VAE posteriors and text-encoder outputs.

    sd3train-precompute --out /data/cache experiment=tiny_cpu data.shards=/data/src/{00000..00009}.tar
    sd3train-precompute --out DIR [--task-index I] [--num-tasks N] [--dtype bf16|fp16|fp32]
                        [--batch-size 16] [--device auto|cpu|cuda] [HYDRA OVERRIDES...]
    python -m sd3train.curation.precompute ...   # the same

The config is composed from the overrides exactly as `sd3train-train` composes it (and validated
the same way: a bad config exits with status 2 and every problem, before any model is built). Then
train on the cache with `data.cached=true` (see conf/data/cached.yaml and the README).

Tasks: the source shards (`data.shards`; relative paths from the repo root, as in training, while
`--out` is from the current directory) are split round-robin, shard i going to task
`i % num_tasks`. `--task-index` defaults to
`(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP` and `--num-tasks` to
`SLURM_ARRAY_TASK_COUNT` (0 and 1 outside a Slurm array), so `sbatch --array=0-63` needs no flags.
Tasks never talk to each other.

Per source shard, `DIR/<its basename>` (a `.tar.gz` source gives a `.tar`) holds the same keys in
the same order, minus the samples that cannot be used (counted per reason and reported; a
truncated or unreadable source gets no output and exit status 1, so a rerun retries it;
`--keep-truncated` publishes the samples before the cut instead); layout in
`sd3train/data/cache_format.py`. Images are decoded as validation decodes them (centre crop, no
flip) at their aspect bucket; the original caption and, with `data.synthetic_caption_key` or
`data.synthetic_captions` (caption tables of sd3train-caption, joined by key; the table first),
the synthetic one are both encoded. Samples are batched per bucket (`--batch-size`), at most
`REORDER_WINDOW_BATCHES` (`encode_shard.py`) batches' worth of samples waiting, and written in
source order.

Restartable: an output that exists is complete (it is written under a hidden temporary name,
fsynced, then renamed) and is skipped; a killed task leaves at most a `.<name>.tmp-*` file, which
its rerun deletes. Tar headers are fixed, and the batching is a function of the shard alone, so the
same inputs, settings and software give byte-identical shards whatever the task split.

`DIR/cache_info.json` records the settings the cache depends on (format, dtype, `vae`, `text`
without its training-time dropout, the data settings in `DATA_FIELDS`, and the caption folder
when `data.synthetic_captions` is set); every task writes the
same one, and a run whose settings differ from an existing one exits with status 2 naming them.

Exit status: 0 done; 1 some source shards could not be read (the others are done; rerun to retry
them); 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sd3train.curation.encode_shard import Encoders, Precomputer
from sd3train.curation.tasks import (  # noqa: F401 (part of this module's interface)
    ShardTally,
    UsageError,
    assigned,
    output_name,
    pick_device,
    resolve_task,
)
from sd3train.data.cache_info import (  # noqa: F401 (DATA_FIELDS re-exported)
    CACHE_INFO_NAME,
    DATA_FIELDS,
    cache_info,
    info_differences,
)
from sd3train.durable import publish_once, remove_leftovers, sync, temporary_file

PROG = "sd3train-precompute"
USAGE_EXIT_CODE = 2
FAILED_SHARDS_EXIT_CODE = 1
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the keys of cache_format.DTYPES (not imported: --help stays fast)




def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Encode image shards into a cache of VAE posteriors and text-encoder outputs "
        "(train on it with data.cached=true).",
        epilog="example: sd3train-precompute --out /data/cache experiment=tiny_cpu "
        "data.shards=/data/src/{00000..00009}.tar",
    )
    parser.add_argument("--out", required=True, help="cache folder (created if missing)")
    parser.add_argument("--task-index", type=int, default=None,
                        help="this task's index (default: from SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="number of tasks sharing the shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="storage dtype (default bf16)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per encoder batch (default 16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the encoders run (auto: cuda when available)")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="publish the samples before the cut of a truncated source shard (default: the "
                             "shard fails, nothing is written for it, and a rerun retries it)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides, as for sd3train-train (experiment=..., data.shards=...)")
    return parser


# --------------------------------------------------------------------- config


def compose_or_usage_error(overrides: list[str]):
    """The validated TrainConfig for `overrides`, composed as sd3train-train composes it (shard specs
    as it takes them: braces unquoted, or expanded by the shell)."""
    from sd3train.config.compose import compose_raw
    from sd3train.config.typed import ConfigError
    from sd3train.config.validate import load_config

    try:
        raw = compose_raw(overrides)
    except Exception as error:  # noqa: BLE001  (Hydra's override and missing-option errors)
        raise UsageError(f"cannot compose the config: {error}") from None
    try:
        return load_config(raw)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def ensure_cache_info(folder: Path, info: dict[str, Any]) -> bool:
    """Write `folder/cache_info.json` if absent (atomically, first writer wins); True if written.

    Raises UsageError when the folder already has one with other settings.
    """
    path = folder / CACHE_INFO_NAME
    if not path.exists():
        descriptor, temporary = temporary_file(folder, CACHE_INFO_NAME)
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
                sync(stream)
            if publish_once(temporary, path):  # False if another task got there first: then compare below
                return True
        finally:
            temporary.unlink(missing_ok=True)
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is unreadable ({error}); remove it if the folder holds no cache shards") from None
    differences = info_differences(existing, info)
    if differences:
        raise UsageError(
            f"{path} was written with other settings, and a cache folder holds one model setup; "
            "use another --out folder or the cache's settings. Differences:\n  " + "\n  ".join(differences)
        )
    return False


# ----------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    task_index, num_tasks = resolve_task(args.task_index, args.num_tasks)
    cfg = compose_or_usage_error(args.overrides)
    data = cfg.data
    if data.sources:
        raise UsageError("data.sources is not supported here: precompute each source's shards with "
                         "data.shards=... (into one folder, or one per source)")
    if data.cached:
        raise UsageError("data.cached=true: precompute reads image shards, not cache shards")
    from sd3train.data.sources import is_url, resolve_shard_urls

    try:
        urls = resolve_shard_urls(data.shards)
    except ValueError as error:
        raise UsageError(f"data.shards: {error}") from None
    names = [output_name(url) for url in urls]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UsageError(f"data.shards: several source shards would write the same cache shard "
                         f"{', '.join(repeated[:5])}; their file names must differ")

    out = Path(args.out)
    clashes = [url for url, name in zip(urls, names)
               if not is_url(url) and Path(url.removeprefix("file:")).resolve() == (out / name).resolve()]
    if clashes:
        raise UsageError(f"--out {out} is where the source shards are ({clashes[0]}): the cache needs its own folder")
    out.mkdir(parents=True, exist_ok=True)
    ensure_cache_info(out, cache_info(cfg, args.dtype))
    mine = assigned(list(zip(urls, names)), task_index, num_tasks)
    removed = remove_leftovers(out, [name for _, name in mine])
    todo = [(url, name) for url, name in mine if not (out / name).exists()]
    device = pick_device(args.device) if todo else "cpu"
    log(f"task {task_index} of {num_tasks}: {len(mine)} of {len(urls)} shard(s), {len(mine) - len(todo)} "
        f"already done -> {out} ({args.dtype}, batch {args.batch_size}, {device})"
        + (f"; removed {removed} temporary file(s) of an interrupted run" if removed else ""))

    tally = ShardTally(log, total=len(todo), unit="samples")
    if todo:
        precomputer = Precomputer(cfg, Encoders(cfg, device), args.dtype, args.batch_size, args.keep_truncated)
        tally.restart_clock()  # samples/s below is the encoding rate, model loading left out
        for url, name in todo:
            shard_start = time.perf_counter()
            result = precomputer.run(url, out / name)
            tally.add(name, url, result.samples, result.skipped, result.examples, result.failure,
                      time.perf_counter() - shard_start)
    return tally.finish(already_done=len(mine) - len(todo))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return run(args)
    except UsageError as error:
        log(str(error))
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
