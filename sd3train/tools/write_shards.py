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
import csv
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from sd3train.data.shards import EncodedImage, ShardSample, check_sidecar_ext, write_shards

PROG = "sd3train-shards"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_LISTED_SKIPS = 20


class UsageError(Exception):
    """Bad arguments or an unusable input table: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Candidate:
    """One input row before it is checked: what to read and how to name it."""

    source_path: str  # as recorded in `<key>.json` and in the skip list
    image_path: Path
    caption: Optional[str]  # None: no caption at all (no sidecar file, missing value)
    synthetic_caption: Optional[str] = None


@dataclass(frozen=True)
class Skip:
    source_path: str
    reason: str
    detail: str = ""


@dataclass
class Tally:
    """What happened to the candidates, filled while write_shards consumes the samples."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[Skip] = field(default_factory=list)

    def skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        if len(self.examples) < MAX_LISTED_SKIPS:
            self.examples.append(skip)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# --- inputs ------------------------------------------------------------------------------------


def _read_caption(path: Path, unreadable_reason: str = "unreadable_caption") -> Optional[str]:
    """A caption file's text, None when there is no such file; SkipSample when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise SkipSample(unreadable_reason, f"{path}: {error}") from None


def folder_candidates(root: Path, synthetic_suffix: str) -> Iterator[Candidate | Skip]:
    """Images under `root` in sorted relative-path order, with their sidecar captions."""
    if not root.is_dir():
        raise UsageError(f"--images {root}: not a folder")
    # Sorted by the relative POSIX path: the same order on every file system.
    images = sorted(
        (path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    for path in images:
        relative = path.relative_to(root).as_posix()
        try:
            caption = _read_caption(path.with_suffix(".txt"))
            synthetic = _read_caption(path.with_name(path.stem + synthetic_suffix), "unreadable_synthetic_caption")
        except SkipSample as skip:
            yield Skip(relative, skip.reason, skip.detail)
            continue
        yield Candidate(relative, path, caption, synthetic)


def _jsonl_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"--table {path}: line {number} is not JSON ({error})") from None
            if not isinstance(row, dict):
                raise UsageError(f"--table {path}: line {number} is not a JSON object")
            rows.append(row)
    # A JSONL row may leave out an optional key: a column exists if any row has it.
    columns = sorted({name for row in rows for name in row})
    return columns, rows


def _csv_rows(path: Path) -> tuple[list[str], Iterable[dict[str, Any]]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
    with open(path, encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    return columns, rows


def _parquet_rows(path: Path, wanted: list[str]) -> tuple[list[str], Iterable[dict[str, Any]]]:
    import pyarrow.parquet as pq  # imported here: only parquet input needs it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise UsageError(f"--table {path}: not a readable parquet file ({error})") from None
    columns = list(parquet.schema_arrow.names)
    present = [name for name in wanted if name in columns]

    def rows() -> Iterator[dict[str, Any]]:
        # Batches and only the needed columns: a big caption table never sits in memory whole.
        for batch in parquet.iter_batches(columns=present):
            yield from batch.to_pylist()

    return columns, rows()


def _cell(row: dict[str, Any], column: Optional[str]) -> Optional[str]:
    """A table cell as text; None for a missing value (no key, null, or an empty CSV cell)."""
    if column is None:
        return None
    value = row.get(column)
    return None if value is None else str(value)


def table_candidates(
    path: Path, path_column: str, caption_column: str, synthetic_column: Optional[str], synthetic_required: bool
) -> Iterator[Candidate | Skip]:
    """The rows of a JSONL/CSV/parquet table, in row order."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UsageError(f"--table {path}: unknown table type {suffix or '(none)'!r}, expected one of {TABLE_SUFFIXES}")
    if not path.is_file():
        raise UsageError(f"--table {path}: no such file")
    wanted = [path_column, caption_column] + ([synthetic_column] if synthetic_column else [])
    if suffix == ".jsonl":
        columns, rows = _jsonl_rows(path)
        check_columns = bool(rows)  # an empty JSONL file has no columns to check; it writes nothing
    elif suffix == ".csv":
        columns, rows = _csv_rows(path)
        check_columns = True
    else:
        columns, rows = _parquet_rows(path, wanted)
        check_columns = True
    required = [path_column, caption_column] + ([synthetic_column] if synthetic_required else [])
    for column in required if check_columns else []:
        if column not in columns:
            raise UsageError(f"--table {path}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
    if synthetic_column not in columns:
        synthetic_column = None  # the default synthetic column is optional
    base = path.parent
    for number, row in enumerate(rows, start=1):
        value = _cell(row, path_column)
        if not value:
            yield Skip(f"{path.name} row {number}", "missing_image", f"empty {path_column!r}")
            continue
        yield Candidate(value, base / value, _cell(row, caption_column), _cell(row, synthetic_column))


# --- checking and building samples --------------------------------------------------------------


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
