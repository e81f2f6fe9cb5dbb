"""Write image/caption pairs as webdataset shards (img2dataset layout) plus `manifest.json`.

    sd3train-shards --images data/raw/photos --out data/photos
    sd3train-shards --table data/raw/captions.parquet --out data/photos --samples-per-shard 5000
    python -m sd3train.tools.write_shards --table captions.csv --out /tmp/shards \\
        --path-column file --caption-column text --synthetic-column recaption

Inputs (exactly one of):
  --images DIR   every `.jpg .jpeg .png .webp` file under DIR (recursive, any case, sorted by path)
                 with its caption in `<stem>.txt` and optionally a synthetic caption in
                 `<stem>.syn.txt` (`--synthetic-suffix`).
  --table FILE   a `.jsonl`, `.csv` or `.parquet` table with columns `path` (relative paths start at
                 the table's folder), `caption` and optionally `synthetic_caption`, in row order.

Sample i (counting written samples only) gets the key `f"{i:0{key_digits}d}"` and the members
`<key>.<ext>` (the image bytes copied unchanged; `.jpeg` is written as `jpg`), `<key>.txt` (the
caption, stripped), `<key>.<synthetic-ext>` (default `syn.txt`, when there is a synthetic caption) and
`<key>.json` (`key, source_path, width, height, caption[, synthetic_caption]`). `source_path` is the
path relative to --images, or the table's value as written, so shards do not depend on where the
input lies. The same inputs give byte-identical shards and manifest.

Samples with a missing, unreadable or empty caption, or a missing, unreadable or undecodable image,
are skipped and counted per reason; the first 20 are listed on stderr, followed by one summary line.
Exit status: 0 when at least one sample was written, 2 when none was (existing shards are then left
alone) or on a usage error.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from sd3train.data.tar_writer import EncodedImage, ShardSample, check_sidecar_ext, write_shards
from sd3train.tools.shard_inputs import (  # noqa: F401 (UsageError etc. are part of this tool's interface)
    IMAGE_SUFFIXES,
    TABLE_SUFFIXES,
    Candidate,
    Skip,
    SkipSample,
    Tally,
    UsageError,
    folder_candidates,
    table_candidates,
)

PROG = "sd3train-shards"


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _read_image(path: Path) -> tuple[EncodedImage, int, int]:
    """The file's bytes (unchanged) and its size; SkipSample when it cannot be used."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SkipSample("unsupported_image_type", str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_image", str(path)) from None
    except OSError as error:
        raise SkipSample("unreadable_image", f"{path}: {error}") from None
    try:
        # open() reads only the header (the size); verify() checks the file's structure without
        # decoding the pixels, which would cost far more on a large dataset.
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()
    except UnidentifiedImageError:
        # Its message names the in-memory stream, not the file.
        raise SkipSample("undecodable_image", f"{path}: not an image PIL recognises") from None
    except Exception as error:  # PIL reports damage as many types (OSError, SyntaxError, struct.error...)
        raise SkipSample("undecodable_image", f"{path}: {type(error).__name__}: {error}") from None
    return EncodedImage(data, _image_ext(path)), width, height


def build_sample(candidate: Candidate, key: str, synthetic_ext: str) -> ShardSample:
    """The shard sample of one candidate; SkipSample when its caption or image is unusable."""
    if candidate.caption is None:
        raise SkipSample("missing_caption")
    caption = candidate.caption.strip()
    if not caption:
        raise SkipSample("empty_caption")
    image, width, height = _read_image(candidate.image_path)
    extra: dict[str, Any] = {
        "key": key,
        "source_path": candidate.source_path,
        "width": width,
        "height": height,
        "caption": caption,
    }
    sidecars = {}
    synthetic = (candidate.synthetic_caption or "").strip()
    if synthetic:  # an empty synthetic caption is as good as none: the sample keeps its real one
        extra["synthetic_caption"] = synthetic
        sidecars[synthetic_ext] = synthetic.encode("utf-8")
    return ShardSample(key, image, caption, extra, sidecars)


def samples(
    candidates: Iterable[Candidate | Skip], tally: Tally, synthetic_ext: str, key_digits: int
) -> Iterator[ShardSample]:
    """Usable samples, keyed by their index among the written ones; skips go to `tally`."""
    for candidate in candidates:
        if isinstance(candidate, Skip):
            tally.skip(candidate)
            continue
        try:
            sample = build_sample(candidate, f"{tally.written:0{key_digits}d}", synthetic_ext)
        except SkipSample as skip:
            tally.skip(Skip(candidate.source_path, skip.reason, skip.detail))
            continue
        tally.written += 1
        yield sample


def _with_first(iterator: Iterator[ShardSample]) -> Optional[Iterator[ShardSample]]:
    """`iterator` unchanged, or None when it is empty (so an all-bad input touches no shard)."""
    try:
        first = next(iterator)
    except StopIteration:
        return None

    def chained() -> Iterator[ShardSample]:
        yield first
        yield from iterator

    return chained()


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input (exactly one)")
    source.add_argument("--images", type=Path, help="folder of images with <stem>.txt captions")
    source.add_argument("--table", type=Path, help="JSONL, CSV or parquet table of path/caption rows")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar ... (default: shard)")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="default: 10000")
    parser.add_argument("--key-digits", type=int, default=9, help="zero-padded width of sample keys (default: 9)")
    parser.add_argument(
        "--synthetic-suffix", default=".syn.txt", help="--images: synthetic caption file <stem>SUFFIX (default: .syn.txt)"
    )
    parser.add_argument(
        "--synthetic-ext", default="syn.txt", help="member extension of the synthetic caption in the tar (default: syn.txt)"
    )
    parser.add_argument("--path-column", default="path", help="--table: image path column (default: path)")
    parser.add_argument("--caption-column", default="caption", help="--table: caption column (default: caption)")
    parser.add_argument(
        "--synthetic-column",
        default=None,
        help="--table: synthetic caption column (default: synthetic_caption, used if present; "
        "a column named here must exist)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if (args.images is None) == (args.table is None):
        raise UsageError("give exactly one of --images DIR or --table FILE")
    if args.samples_per_shard <= 0:
        raise UsageError(f"--samples-per-shard must be positive, got {args.samples_per_shard}")
    if args.key_digits <= 0:
        raise UsageError(f"--key-digits must be positive, got {args.key_digits}")
    if not args.prefix or "/" in args.prefix:
        raise UsageError(f"--prefix {args.prefix!r} must be a non-empty name without '/'")
    if not args.synthetic_suffix:
        raise UsageError("--synthetic-suffix must not be empty")
    try:
        check_sidecar_ext(args.synthetic_ext)
    except ValueError as error:
        raise UsageError(f"--synthetic-ext: {error}") from None


def _candidates(args: argparse.Namespace) -> Iterator[Candidate | Skip]:
    if args.images is not None:
        return folder_candidates(args.images, args.synthetic_suffix)
    synthetic_column = args.synthetic_column or "synthetic_caption"
    return table_candidates(
        args.table, args.path_column, args.caption_column, synthetic_column, args.synthetic_column is not None
    )


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """How the shards were made, recorded in the manifest (only arguments: it must be reproducible)."""
    source: dict[str, Any] = {
        "tool": PROG,
        "samples_per_shard": args.samples_per_shard,
        "key_digits": args.key_digits,
        "synthetic_ext": args.synthetic_ext,
    }
    if args.images is not None:
        source.update(images=str(args.images), synthetic_suffix=args.synthetic_suffix)
    else:
        source.update(
            table=str(args.table),
            path_column=args.path_column,
            caption_column=args.caption_column,
            synthetic_column=args.synthetic_column or "synthetic_caption",
        )
    return source


def _report(tally: Tally, shards: int, total_bytes: int, seconds: float, out: Path) -> None:
    for skip in tally.examples:
        detail = f" ({skip.detail})" if skip.detail else ""
        print(f"{PROG}: skipped {skip.source_path}: {skip.reason}{detail}", file=sys.stderr)
    skipped_total = sum(tally.skipped.values())
    if skipped_total > len(tally.examples):
        print(f"{PROG}: ... and {skipped_total - len(tally.examples)} more skipped", file=sys.stderr)
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(tally.skipped.items()))
    skipped = f"skipped {skipped_total}" + (f" ({reasons})" if reasons else "")
    where = f"in {out}" if tally.written else f"nothing written to {out}"
    print(
        f"{PROG}: {shards} shards, {tally.written} samples, {skipped}, {total_bytes} bytes, {seconds:.2f} s, {where}",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Write the shards `args` describe; the exit status."""
    _check_args(args)
    start = time.perf_counter()
    tally = Tally()
    stream = _with_first(samples(_candidates(args), tally, args.synthetic_ext, args.key_digits))
    entries: list[dict] = []
    if stream is not None:
        entries = write_shards(
            stream, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard, source=_source(args)
        )
    _report(tally, len(entries), sum(entry["bytes"] for entry in entries), time.perf_counter() - start, args.out)
    return 0 if tally.written else 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on bad arguments; callers of main() (tests, wrappers) get the status instead.
        return int(exit_.code or 0)
    try:
        return run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
