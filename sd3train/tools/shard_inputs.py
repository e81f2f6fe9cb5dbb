"""The inputs of sd3train-shards: image files with sidecar captions, or a JSONL/CSV/parquet table,
as candidate samples (checked later), and the tally of what was skipped and why."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_LISTED_SKIPS = 20  # skipped inputs listed by name in the report


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
