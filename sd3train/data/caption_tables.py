"""Caption tables: synthetic captions kept beside the image shards, joined to samples by key.

    captions = SyntheticCaptions.from_config(cfg.data)    # None without data.synthetic_captions
    table = captions.for_shard(url)                       # that shard's {key: caption}, read once
    raw = table.attach(raw)                               # the sample, its synthetic caption in SYNTHETIC_FIELD

Layout (written by `sd3train-caption`, `sd3train/curation/caption.py`): a folder holding
`caption_info.json` (format, model, prompt, max_new_tokens, dtype, image_key) and, per image shard, one
`<shard name stem>.jsonl` named after the shard's file name (`shard_file_name`: `a/00001.tar`,
`pipe:aws s3 cp s3://b/00001.tar -` and `00001.tar.gz` all give `00001.jsonl`). Each line is
`{"key": ..., "caption": ...}` (UTF-8, keys sorted), in shard order; a sample without a usable
caption has no line. The image shards are never rewritten.

The join: while a shard is read, its table is loaded (one shard's table in memory at a time) and
each sample gets the table's caption for its key under `SYNTHETIC_FIELD`, a field name no tar
member can have (it holds a '/'). A sample the table lacks falls back to its own synthetic caption
when `data.synthetic_caption_key` is also set, else it has none; the decoder's per-(seed, key,
epoch) choice with `p_synthetic` (`captions.py`) then applies unchanged, and a sample with no
synthetic caption trains with its original one. A shard without a table (captioning failed for
it) is read as an empty table (a rate-limited warning each time; the datamodule also warns once
at setup with the count).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sd3train.data.captions import CaptionField
from sd3train.data.shard_names import shard_file_name
from sd3train.data.tar_reader import RawSample

LOG = logging.getLogger("sd3train.data")

CAPTION_FORMAT = 1
CAPTION_INFO_NAME = "caption_info.json"
TABLE_SUFFIX = ".jsonl"
# The decoder's synthetic field when tables are in use; tar member names never give a '/' here.
SYNTHETIC_FIELD = "sd3train/synthetic_caption"


_missing_logged = 0  # per process: the first few missing tables are logged, then the 10th, 100th, ...


def _log_missing(path: Path, url: str) -> None:
    global _missing_logged
    _missing_logged += 1
    count = _missing_logged
    while count > 5 and count % 10 == 0:
        count //= 10
    if _missing_logged <= 5 or count == 1:
        LOG.warning("no caption table %s for shard %s (%d so far in this process): its samples keep their own "
                    "captions", path, url, _missing_logged)


class CaptionTableError(ValueError):
    """A caption table that is not what sd3train-caption writes."""


def table_name(url: str) -> str:
    """The caption table's file name for a shard url: `<shard_file_name stem>.jsonl`; ShardNameError when
    the url names no tar."""
    return shard_file_name(url).removesuffix(".tar") + TABLE_SUFFIX


def table_line(key: str, caption: str) -> bytes:
    """One row of a table, newline included (the same bytes for the same row on every machine)."""
    return (json.dumps({"key": key, "caption": caption}, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def read_table(path: Path) -> dict[str, str]:
    """{key: caption} of one table file; the first row of a repeated key wins."""
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, caption = row["key"], row["caption"]
            except (ValueError, KeyError, TypeError) as error:
                raise CaptionTableError(f"{path}:{number}: not a caption row ({type(error).__name__}: {error})") from None
            if not isinstance(key, str) or not isinstance(caption, str):
                raise CaptionTableError(f"{path}:{number}: key and caption must be strings")
            table.setdefault(key, caption)
    return table


def read_caption_info(folder: Path) -> Optional[dict]:
    try:
        info = json.loads((folder / CAPTION_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@dataclass(frozen=True)
class ShardCaptions:
    """One shard's table, and the sample's own synthetic caption as the fallback."""

    table: dict[str, str]
    fallback: Optional[CaptionField] = None

    def caption(self, raw: RawSample) -> Optional[str]:
        caption = self.table.get(raw.key)
        if caption is not None and caption.strip():
            return caption.strip()
        return self.fallback.read(raw.fields) if self.fallback is not None else None

    def attach(self, raw: RawSample) -> RawSample:
        fields = {name: data for name, data in raw.fields.items() if name != SYNTHETIC_FIELD}
        caption = self.caption(raw)
        if caption is not None:
            fields[SYNTHETIC_FIELD] = caption.encode("utf-8")
        return RawSample(raw.key, raw.url, fields)


@dataclass(frozen=True)
class SyntheticCaptions:
    """A folder of caption tables (`data.synthetic_captions`), with `data.synthetic_caption_key` as fallback."""

    folder: Path
    fallback: Optional[CaptionField] = None

    @classmethod
    def from_config(cls, data) -> Optional["SyntheticCaptions"]:
        if data.synthetic_captions is None:
            return None
        from sd3train.paths import resolve_repo_path

        fallback = CaptionField.parse(data.synthetic_caption_key) if data.synthetic_caption_key else None
        return cls(resolve_repo_path(data.synthetic_captions), fallback)

    def path(self, url: str) -> Path:
        return self.folder / table_name(url)

    def for_shard(self, url: str, log: bool = True) -> ShardCaptions:
        path = self.path(url)
        try:
            table = read_table(path)
        except FileNotFoundError:
            table = {}
            if log:
                _log_missing(path, url)
        return ShardCaptions(table, self.fallback)

    def missing(self, urls: list[str]) -> list[str]:
        """The urls whose table file is absent."""
        return [url for url in urls if not self.path(url).is_file()]
