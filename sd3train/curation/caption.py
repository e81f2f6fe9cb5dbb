"""sd3train-caption: synthetic captions for image shards from a local vision-language model.

    sd3train-caption --shards '/data/src/{00000..00009}.tar' --model /models/llava-1.5-7b-hf --out /data/captions
    sd3train-caption --shards SPEC --model PATH --out DIR [--prompt TEXT] [--batch-size 8]
                     [--max-new-tokens 77] [--dtype bf16|fp16|fp32] [--device auto|cpu|cuda]
                     [--image-key jpg;jpeg;png;webp] [--task-index I] [--num-tasks N]
    python -m sd3train.curation.caption ...   # the same

Then train with `data.synthetic_captions=DIR` (and `data.p_synthetic`, 0.5 by default): the
training stream joins each shard's table to its samples by key, so the image shards are never
rewritten (`sd3train/data/caption_tables.py`; sd3train-precompute reads the tables the same way).

`--shards` takes what `data.shards` takes (brace ranges, '::'-separated lists, `pipe:` urls);
relative paths are from the repo root, as in training and sd3train-dedup (`--out` and `--model`
are from the current directory). The model is any image-text-to-text model
transformers loads from a local folder (`sd3train/curation/vlm.py`: chat template or plain prompt,
greedy decoding, only the new tokens kept, stripped).

Output: per shard `DIR/<shard name stem>.jsonl` (`00001.tar` -> `00001.jsonl`; names as
sd3train-precompute names its shards), one `{"key", "caption"}` line per sample in shard order.
A sample whose image is missing or does not decode, or whose caption comes out empty, has no line
(counted per reason and reported); training gives it its original caption. A shard that is
truncated or cannot be read gets no table and exit status 1, so a rerun retries it.
`DIR/caption_info.json` records the model folder, prompt, max_new_tokens, dtype, batch size (a
caption can depend on the padding of its batch) and image key;
every task writes the same one, and a run with other settings into the same folder exits with
status 2 naming them.

Tasks: shard i goes to task `i % num_tasks`; `--task-index` and `--num-tasks` default to the Slurm
array variables (`sbatch --array=0-63` needs no flags), as for sd3train-precompute. Restartable: a
table is written under a hidden temporary name, fsynced and renamed, so one that exists is complete
and is skipped; a killed task leaves at most a `.<name>.tmp-*` file, which its rerun deletes. The
batching is a function of the shard and `--batch-size` alone, so the tables do not depend on the
task split or on interruptions.

Exit status: 0 done; 1 some shards could not be read (the others are done; rerun to retry them);
2 usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3train.curation.tasks import ShardTally, UsageError, assigned, note_problem, pick_device, resolve_task
from sd3train.curation.vlm import DEFAULT_PROMPT, DTYPE_NAMES, ModelLoadError
from sd3train.data.caption_tables import CAPTION_FORMAT, CAPTION_INFO_NAME, table_line, table_name
from sd3train.data.shard_names import ShardNameError
from sd3train.durable import publish_once, remove_leftovers, replace, sync, temporary_file

PROG = "sd3train-caption"
USAGE_EXIT_CODE = 2
FAILED_SHARDS_EXIT_CODE = 1
DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"  # DataConfig.image_key's default
EMPTY_CAPTION = "empty_caption"


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Caption image shards with a local vision-language model into per-shard caption tables "
        "(train with data.synthetic_captions=DIR).",
        epilog=f"example: {PROG} --shards '/data/src/{{00000..00009}}.tar' --model /models/llava --out /data/captions",
    )
    parser.add_argument("--shards", required=True, help="shard spec, as data.shards (relative paths from the repo root, as in training)")
    parser.add_argument("--model", required=True, help="local folder of the model and its processor")
    parser.add_argument("--out", required=True, help="caption folder (created if missing)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"instruction given with each image (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate() call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=77, help="longest caption in tokens (default 77)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="model dtype (default bf16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto: cuda when available)")
    parser.add_argument("--image-key", default=DEFAULT_IMAGE_KEY,
                        help=f"image extensions in order of preference, as data.image_key (default {DEFAULT_IMAGE_KEY})")
    parser.add_argument("--task-index", type=int, default=None,
                        help="this task's index (default: from SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="number of tasks sharing the shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    return parser


# ------------------------------------------------------------------ settings


def caption_info(args: argparse.Namespace) -> dict[str, Any]:
    """What `DIR/caption_info.json` holds: the settings every table of the folder was made with."""
    return {
        "format": CAPTION_FORMAT,
        "model": str(Path(args.model).resolve()),
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        # Padding in a batch can change a caption (vlm.py), so one folder holds one batch size.
        "batch_size": args.batch_size,
        "image_key": args.image_key,
    }


def ensure_caption_info(folder: Path, info: dict[str, Any]) -> None:
    """Write `folder/caption_info.json` if absent (first writer wins); else check it matches `info`."""
    from sd3train.data.cache_info import info_differences

    path = folder / CAPTION_INFO_NAME
    if not path.exists():
        descriptor, temporary = temporary_file(folder, CAPTION_INFO_NAME)
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
                sync(stream)
            if publish_once(temporary, path):
                return
        finally:
            temporary.unlink(missing_ok=True)
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is unreadable ({error}); remove it if the folder holds no caption tables") from None
    differences = info_differences(existing, info, label="the folder")
    if differences:
        raise UsageError(
            f"{path} was written with other settings, and a caption folder holds one model's captions; "
            "use another --out folder or its settings. Differences:\n  " + "\n  ".join(differences)
        )


# --------------------------------------------------------------------- shards


@dataclass
class ShardResult:
    samples: int = 0  # captions written
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one detail
    failure: str | None = None  # why the shard could not be read (no table written)

    def skip(self, reason: str, key: str | None, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{key}: {detail}" if key else detail)


def _open_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")  # decodes it: a damaged payload raises here


def caption_shard(url: str, out_path: Path, model, image_extensions: tuple[str, ...], batch_size: int) -> ShardResult:
    """Write the caption table of `url` to `out_path` (atomically), unless the shard cannot be read."""
    from sd3train.data.skips import DECODE_ERROR, NO_IMAGE
    from sd3train.data.tar_reader import ShardProblem, read_shard

    result = ShardResult()
    descriptor, temporary = temporary_file(out_path.parent, out_path.name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            keys: list[str] = []
            images: list[Any] = []

            def flush() -> None:
                for key, caption in zip(keys, model.caption(images), strict=True):
                    if caption:
                        stream.write(table_line(key, caption))
                        result.samples += 1
                    else:
                        result.skip(EMPTY_CAPTION, key, "the model generated no text")
                stream.flush()  # a killed run's temporary file shows how far it got
                keys.clear()
                images.clear()

            for event in read_shard(url):
                if isinstance(event, ShardProblem):
                    note_problem(result, event)
                    continue
                extension = next((ext for ext in image_extensions if ext in event.fields), None)
                if extension is None:
                    result.skip(NO_IMAGE, event.key, f"no field in {list(image_extensions)} (has {sorted(event.fields)})")
                    continue
                try:
                    image = _open_image(event.fields[extension])
                except Exception as error:  # PIL raises many types for bad data
                    result.skip(DECODE_ERROR, event.key, f"{type(error).__name__}: {error}")
                    continue
                keys.append(event.key)
                images.append(image)
                if len(images) == batch_size:
                    flush()
            if result.failure is None:
                flush()
                sync(stream)
        if result.failure is None:
            replace(temporary, out_path)
    finally:
        temporary.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    task_index, num_tasks = resolve_task(args.task_index, args.num_tasks)
    from sd3train.data.decoders import parse_extensions
    from sd3train.data.sources import resolve_shard_urls

    try:
        image_extensions = tuple(parse_extensions(args.image_key))
    except ValueError as error:
        raise UsageError(f"--image-key: {error}") from None
    try:
        urls = resolve_shard_urls(args.shards)
    except ValueError as error:
        raise UsageError(f"--shards: {error}") from None
    try:
        names = [table_name(url) for url in urls]
    except ShardNameError as error:
        raise UsageError(f"--shards: {error}") from None
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UsageError(f"--shards: several shards would write the same caption table {', '.join(repeated[:5])}; "
                         "their file names must differ (caption each set into its own --out)")
    if not Path(args.model).is_dir():
        raise UsageError(f"--model: {args.model} is not a folder (a model saved with save_pretrained)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_caption_info(out, caption_info(args))
    mine = assigned(list(zip(urls, names)), task_index, num_tasks)
    removed = remove_leftovers(out, [name for _, name in mine])
    todo = [(url, name) for url, name in mine if not (out / name).exists()]
    device = "cpu"
    if todo:
        device = pick_device(args.device)
    log(f"task {task_index} of {num_tasks}: {len(mine)} of {len(urls)} shard(s), {len(mine) - len(todo)} "
        f"already done -> {out} ({args.model}, {args.dtype}, batch {args.batch_size}, {device})"
        + (f"; removed {removed} temporary file(s) of an interrupted run" if removed else ""))

    tally = ShardTally(log, total=len(todo), unit="captions", rate_digits=2)
    if todo:
        from sd3train.curation.vlm import CaptionModel

        try:
            model = CaptionModel.load(args.model, device, args.dtype, args.prompt, args.max_new_tokens)
        except ModelLoadError as error:
            raise UsageError(f"--model: {error}") from None
        tally.restart_clock()  # captions/s below leaves model loading out
        for url, name in todo:
            shard_start = time.perf_counter()
            result = caption_shard(url, out / name, model, image_extensions, args.batch_size)
            tally.add(name, url, result.samples, result.skipped, result.examples, result.failure,
                      time.perf_counter() - shard_start)
    return tally.finish(already_done=len(mine) - len(todo), written="table(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        log(str(error))
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
